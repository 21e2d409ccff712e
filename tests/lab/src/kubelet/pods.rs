//! Pod workers: one task per pod, as in the kubelet. A worker owns its pod's sandbox and
//! processes, reacts to spec updates, container exits and network readiness, and reports status.
//!
//! The API server is behind [`PodApi`] so that the whole lifecycle runs in tests with a recording
//! fake; the worker itself never panics on odd pods (missing fields become a reported failure).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Container, Pod, PodStatus};
use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::cni;
use super::containers::{self, ContainerRecord, EnvContext};
use super::network::{self, NetworkState};
use super::probes::{self, ProbeSpec, ProbeState};
use super::sandbox::{PodKey, SandboxRecord, Sandboxes};
use super::status::{self, ContainerView, InitProgress, PodView, RuntimeState, Termination};

/// How often a worker re-evaluates its pod without other triggers.
const SYNC_TICK: Duration = Duration::from_secs(1);
/// Sandbox creation retry backoff bounds.
const SANDBOX_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Default `terminationGracePeriodSeconds`.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum PodApiError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Other(String),
}

/// An event about a pod (aggregated by the implementation, as the kubelet's event correlator).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    /// `Normal` or `Warning`.
    pub type_: &'static str,
    pub reason: &'static str,
    pub message: String,
}

impl EventRecord {
    pub fn warning(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            type_: "Warning",
            reason,
            message: message.into(),
        }
    }
    pub fn normal(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            type_: "Normal",
            reason,
            message: message.into(),
        }
    }
}

/// What a pod worker needs from the API server.
pub trait PodApi: Send + Sync + 'static {
    /// Merge patch of `pods/status`.
    fn patch_status(
        &self,
        pod: &PodKey,
        patch: Value,
    ) -> impl Future<Output = Result<(), PodApiError>> + Send;
    /// Final delete: `gracePeriodSeconds=0` with a uid precondition; an absent pod is success.
    fn delete_pod(&self, pod: &PodKey) -> impl Future<Output = Result<(), PodApiError>> + Send;
    fn record_event(
        &self,
        pod: &PodKey,
        event: EventRecord,
    ) -> impl Future<Output = Result<(), PodApiError>> + Send;
}

/// Node-wide settings and shared state of the workers.
pub struct NodeContext {
    pub node_name: String,
    pub node_ip: IpAddr,
    pub sandboxes: Sandboxes,
    pub network: watch::Receiver<NetworkState>,
    /// `PATH` of containers (the veilnet binary's directory first).
    pub path: String,
    /// Upper bound of the termination grace period in the lab.
    pub max_grace: Duration,
}

/// Exit of a process started by this kubelet.
struct Exit {
    container: String,
    generation: u64,
    status: std::process::ExitStatus,
}

struct ContainerSlot {
    name: String,
    image: String,
    state: RuntimeState,
    last_termination: Option<Termination>,
    restart_count: u32,
    pid: i32,
    start_ticks: u64,
    started_at: Option<Timestamp>,
    /// Our own child (exit arrives on the channel) or adopted from a previous kubelet (polled).
    adopted: bool,
    generation: u64,
    started_instant: Option<Instant>,
    next_start: Instant,
    /// Consecutive restarts for the backoff (reset after a long run).
    backoff_step: u32,
    probe: Option<(ProbeSpec, ProbeState)>,
    liveness: Option<(ProbeSpec, ProbeState)>,
    env: Vec<(String, String)>,
}

impl ContainerSlot {
    fn new(name: &str, image: &str) -> Self {
        Self {
            name: name.to_string(),
            image: image.to_string(),
            state: RuntimeState::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            },
            last_termination: None,
            restart_count: 0,
            pid: 0,
            start_ticks: 0,
            started_at: None,
            adopted: false,
            generation: 0,
            started_instant: None,
            next_start: Instant::now(),
            backoff_step: 0,
            probe: None,
            liveness: None,
            env: Vec::new(),
        }
    }

    fn running(&self) -> bool {
        matches!(self.state, RuntimeState::Running { .. })
    }

    fn record(&self) -> ContainerRecord {
        let last_exit = match &self.state {
            RuntimeState::Terminated(t) => Some(t.clone()),
            _ => self.last_termination.clone(),
        };
        ContainerRecord {
            pid: if self.running() { self.pid } else { 0 },
            start_ticks: self.start_ticks,
            started_at: self.started_at,
            restart_count: self.restart_count,
            last_exit,
        }
    }

    fn view(&self) -> ContainerView {
        let ready = match &self.probe {
            Some((_, st)) => st.passing,
            None => true,
        };
        ContainerView {
            name: self.name.clone(),
            image: self.image.clone(),
            state: self.state.clone(),
            last_termination: self.last_termination.clone(),
            restart_count: self.restart_count,
            container_id: (self.pid > 0 || !matches!(self.state, RuntimeState::Waiting { .. }))
                .then(|| format!("veilnet-lab://{}", self.pid)),
            ready: ready && self.running(),
        }
    }
}

fn should_restart(policy: &str, exit_code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

/// A sidecar: an init container with `restartPolicy: Always`, running next to the containers.
fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// The restart policy of an init container: sidecars always, others until they succeed (never
/// for a `Never` pod).
fn init_policy<'a>(c: &Container, pod_policy: &'a str) -> &'a str {
    if is_sidecar(c) {
        "Always"
    } else if pod_policy == "Never" {
        "Never"
    } else {
        "OnFailure"
    }
}

/// True when `c` no longer holds up the next init container.
fn init_done(c: &Container, slot: &ContainerSlot) -> bool {
    if is_sidecar(c) {
        slot.running()
    } else {
        matches!(&slot.state, RuntimeState::Terminated(t) if t.exit_code == 0)
    }
}

fn restart_policy(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.restart_policy.clone())
        .unwrap_or_else(|| "Always".into())
}

/// A container's probe with a fresh state; unsupported probes are ignored with a warning.
fn probe_for(
    container: &Container,
    probe: Option<&k8s_openapi::api::core::v1::Probe>,
    liveness: bool,
    key: &PodKey,
) -> Option<(ProbeSpec, ProbeState)> {
    match probes::probe_spec(probe?, container) {
        Ok(spec) => {
            let state = ProbeState::new(&spec, Instant::now(), liveness);
            Some((spec, state))
        }
        Err(reason) => {
            tracing::warn!(pod = %key, container = %container.name, liveness, "probe ignored: {reason}");
            None
        }
    }
}

/// The termination grace period of a deleted pod, capped for the lab.
pub fn grace_period(pod: Option<&Pod>, cap: Duration) -> Duration {
    let secs = pod.and_then(|p| {
        p.metadata
            .deletion_grace_period_seconds
            .or_else(|| p.spec.as_ref()?.termination_grace_period_seconds)
    });
    let grace = match secs {
        Some(s) => Duration::from_secs(u64::try_from(s).unwrap_or(0)),
        None => DEFAULT_GRACE,
    };
    grace.min(cap)
}

/// Runs one pod from first sight to teardown.
pub struct PodWorker<A: PodApi> {
    ctx: Arc<NodeContext>,
    api: Arc<A>,
    key: PodKey,
    pod_rx: watch::Receiver<Option<Arc<Pod>>>,
    sandbox: Option<SandboxRecord>,
    sandbox_attempts: u32,
    sandbox_next: Instant,
    slots: BTreeMap<String, ContainerSlot>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits_rx: mpsc::UnboundedReceiver<Exit>,
    /// The pod finished (Succeeded/Failed): nothing restarts, the network is released.
    terminal: bool,
    last_sent: Option<PodStatus>,
    rv_at_send: Option<String>,
    /// The init containers are through (never goes back, as in the kubelet).
    initialized: bool,
}

/// How a worker ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerExit {
    /// Torn down (pod deleted or gone).
    TornDown,
    /// The kubelet is shutting down: everything was left in place.
    Shutdown,
}

impl<A: PodApi> PodWorker<A> {
    pub fn new(
        ctx: Arc<NodeContext>,
        api: Arc<A>,
        key: PodKey,
        pod_rx: watch::Receiver<Option<Arc<Pod>>>,
    ) -> Self {
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        Self {
            ctx,
            api,
            key,
            pod_rx,
            sandbox: None,
            sandbox_attempts: 0,
            sandbox_next: Instant::now(),
            slots: BTreeMap::new(),
            exits_tx,
            exits_rx,
            terminal: false,
            last_sent: None,
            rv_at_send: None,
            initialized: false,
        }
    }

    fn pod_dir(&self) -> PathBuf {
        self.ctx.sandboxes.pod_dir(&self.key)
    }

    /// The worker's loop. Returns when the pod is torn down, or when the sender of `pod_rx` is
    /// dropped (kubelet shutdown: pods are left running, as a real kubelet leaves containers).
    pub async fn run(mut self) -> WorkerExit {
        self.adopt().await;
        let mut network = self.ctx.network.clone();
        // Once the readiness publisher is gone there is nothing left to wait for on it.
        let mut network_alive = true;
        loop {
            let pod = self.pod_rx.borrow_and_update().clone();
            match pod {
                Some(p) if p.metadata.deletion_timestamp.is_none() => self.sync(&p).await,
                other => {
                    if self.terminate(other.as_deref()).await {
                        return WorkerExit::TornDown;
                    }
                    return WorkerExit::Shutdown;
                }
            }
            tokio::select! {
                changed = self.pod_rx.changed() => {
                    if changed.is_err() {
                        return WorkerExit::Shutdown;
                    }
                }
                Some(exit) = self.exits_rx.recv() => self.handle_exit(exit),
                changed = network.changed(), if network_alive => network_alive = changed.is_ok(),
                _ = tokio::time::sleep(SYNC_TICK) => {}
            }
        }
    }

    /// Takes over what a previous kubelet left: the sandbox and the container processes.
    async fn adopt(&mut self) {
        if let Some(record) = self.ctx.sandboxes.read_record(&self.key) {
            if record.usable() {
                tracing::info!(pod = %self.key, netns = %record.netns, "adopting sandbox");
                let config = self.ctx.network.borrow().config.clone();
                if let Some(list) = config {
                    let caps = self
                        .pod_rx
                        .borrow()
                        .as_deref()
                        .map(cni::capability_args_for_pod)
                        .unwrap_or_default();
                    if let Err(e) = self.ctx.sandboxes.check(&record, &list, caps).await {
                        tracing::warn!(pod = %self.key, error = %e, "CHECK of adopted sandbox failed");
                    }
                }
                self.sandbox = Some(record);
            } else {
                // Half made (crash during ADD) or its namespace vanished: undo and start over.
                let config = self.ctx.network.borrow().config.clone();
                if let Err(e) = self
                    .ctx
                    .sandboxes
                    .teardown(&record, config.as_deref())
                    .await
                {
                    tracing::warn!(pod = %self.key, error = %e, "cleaning up stale sandbox failed");
                }
            }
        }
        let dir = self.pod_dir();
        for (name, record) in containers::read_records(&dir) {
            let mut slot = ContainerSlot::new(&name, "");
            slot.restart_count = record.restart_count;
            slot.last_termination = record.last_exit.clone();
            slot.started_at = record.started_at;
            if record.pid > 0 && containers::record_alive(&record) && self.sandbox.is_some() {
                slot.pid = record.pid;
                slot.start_ticks = record.start_ticks;
                slot.adopted = true;
                slot.started_instant = Some(Instant::now());
                slot.state = RuntimeState::Running {
                    started_at: record.started_at.unwrap_or_else(Timestamp::now),
                };
                slot.last_termination = record.last_exit;
            } else if record.pid > 0 {
                // It ended while no kubelet watched: its exit code is lost.
                containers::signal_group(record.pid, record.start_ticks, Signal::SIGKILL);
                slot.state = RuntimeState::Terminated(Termination {
                    exit_code: 255,
                    signal: None,
                    reason: "Unknown".into(),
                    message: Some("the process ended while the kubelet was not running".into()),
                    started_at: record.started_at,
                    finished_at: Timestamp::now(),
                    container_id: Some(format!("veilnet-lab://{}", record.pid)),
                });
            } else if let Some(exit) = record.last_exit {
                slot.state = RuntimeState::Terminated(exit);
                slot.last_termination = None;
            }
            self.slots.insert(name, slot);
        }
    }

    fn handle_exit(&mut self, exit: Exit) {
        let dir = self.pod_dir();
        let Some(slot) = self.slots.get_mut(&exit.container) else {
            return;
        };
        if slot.generation != exit.generation || !slot.running() {
            return;
        }
        let (exit_code, signal, reason) = containers::describe_exit(exit.status);
        tracing::info!(pod = %self.key, container = %slot.name, exit_code, "container exited");
        slot.state = RuntimeState::Terminated(Termination {
            exit_code,
            signal,
            reason: reason.into(),
            message: None,
            started_at: slot.started_at,
            finished_at: Timestamp::now(),
            container_id: Some(format!("veilnet-lab://{}", slot.pid)),
        });
        containers::write_record(&dir, &slot.name, &slot.record());
    }

    /// Notices adopted processes that ended (they are not our children: no exit status).
    fn poll_adopted(&mut self) {
        let dir = self.pod_dir();
        for slot in self.slots.values_mut() {
            if slot.adopted && slot.running() {
                let rec = ContainerRecord {
                    pid: slot.pid,
                    start_ticks: slot.start_ticks,
                    ..Default::default()
                };
                if !containers::record_alive(&rec) {
                    slot.state = RuntimeState::Terminated(Termination {
                        exit_code: 255,
                        signal: None,
                        reason: "Unknown".into(),
                        message: Some("exit status of an adopted process is unknown".into()),
                        started_at: slot.started_at,
                        finished_at: Timestamp::now(),
                        container_id: Some(format!("veilnet-lab://{}", slot.pid)),
                    });
                    slot.adopted = false;
                    containers::write_record(&dir, &slot.name, &slot.record());
                }
            }
        }
    }

    async fn event(&self, event: EventRecord) {
        if let Err(e) = self.api.record_event(&self.key, event).await {
            tracing::debug!(pod = %self.key, error = %e, "failed to record event");
        }
    }

    async fn sync(&mut self, pod: &Pod) {
        let specs: Vec<Container> = pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        let inits: Vec<Container> = pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.clone())
            .unwrap_or_default();
        for c in specs.iter().chain(&inits) {
            let slot = self
                .slots
                .entry(c.name.clone())
                .or_insert_with(|| ContainerSlot::new(&c.name, ""));
            slot.image = c.image.clone().unwrap_or_default();
            // A process adopted from a previous kubelet gets its probes back.
            if slot.adopted && slot.running() && slot.env.is_empty() {
                slot.env = vec![("PATH".into(), self.ctx.path.clone())];
                slot.probe = probe_for(c, c.readiness_probe.as_ref(), false, &self.key);
                slot.liveness = probe_for(c, c.liveness_probe.as_ref(), true, &self.key);
            }
        }
        self.poll_adopted();
        let policy = restart_policy(pod);
        let mut failure = None;
        if specs.is_empty() {
            failure = Some((
                "InvalidSpec".to_string(),
                "pod has no containers".to_string(),
            ));
        }

        // Before touching the sandbox: a pod that finished (e.g. seen again after a restart)
        // must not get a new one.
        self.finish_if_terminal(&specs, &inits, &policy, failure.is_some())
            .await;
        if !self.terminal && failure.is_none() {
            self.ensure_sandbox(pod).await;
            if let Some(sandbox) = self.sandbox.clone() {
                if !sandbox.usable() {
                    tracing::warn!(pod = %self.key, netns = %sandbox.netns, "sandbox netns vanished, recreating");
                    self.event(EventRecord::normal(
                        "SandboxChanged",
                        "Pod sandbox changed, it will be killed and re-created.",
                    ))
                    .await;
                    self.stop_containers(Duration::ZERO).await;
                    self.release_sandbox().await;
                } else {
                    self.sync_all(pod, &specs, &inits, &sandbox, &policy).await;
                }
            }
        }

        let (views, init) = self
            .finish_if_terminal(&specs, &inits, &policy, failure.is_some())
            .await;
        let init_views: Vec<ContainerView> = inits
            .iter()
            .filter_map(|c| self.slots.get(&c.name).map(ContainerSlot::view))
            .collect();
        let view = PodView {
            restart_policy: policy,
            sandbox_ready: self.sandbox.is_some(),
            pod_ips: self
                .sandbox
                .as_ref()
                .map(|s| s.ips.clone())
                .or_else(|| self.last_known_ips(pod))
                .unwrap_or_default(),
            host_ip: self.ctx.node_ip.to_string(),
            containers: views,
            init_containers: init_views,
            init,
            failure,
        };
        self.report(pod, &view).await;
    }

    /// Runs the init containers one after the other (sidecars, `restartPolicy: Always`, only
    /// need to be running), then the containers.
    async fn sync_all(
        &mut self,
        pod: &Pod,
        specs: &[Container],
        inits: &[Container],
        sandbox: &SandboxRecord,
        policy: &str,
    ) {
        if !self.initialized {
            for c in inits {
                self.sync_containers(pod, &[(c, init_policy(c, policy))], sandbox)
                    .await;
                if !self.slots.get(&c.name).is_some_and(|s| init_done(c, s)) {
                    break;
                }
            }
            self.initialized = self.init_progress(inits, policy) == InitProgress::Done;
        } else {
            let sidecars: Vec<(&Container, &str)> = inits
                .iter()
                .filter(|c| is_sidecar(c))
                .map(|c| (c, "Always"))
                .collect();
            self.sync_containers(pod, &sidecars, sandbox).await;
        }
        if self.initialized {
            let main: Vec<(&Container, &str)> = specs.iter().map(|c| (c, policy)).collect();
            self.sync_containers(pod, &main, sandbox).await;
        }
    }

    /// Where the init containers are (sticky once done, as in the kubelet).
    fn init_progress(&self, inits: &[Container], policy: &str) -> InitProgress {
        if self.initialized {
            return InitProgress::Done;
        }
        for c in inits {
            let Some(slot) = self.slots.get(&c.name) else {
                return InitProgress::Pending;
            };
            if init_done(c, slot) {
                continue;
            }
            return match &slot.state {
                RuntimeState::Terminated(t) if t.exit_code != 0 && policy == "Never" => {
                    InitProgress::Failed
                }
                _ => InitProgress::Pending,
            };
        }
        InitProgress::Done
    }

    /// Marks the pod finished when its phase became terminal: processes left in the group are
    /// killed and the network is released. Returns the container views and the init progress.
    async fn finish_if_terminal(
        &mut self,
        specs: &[Container],
        inits: &[Container],
        policy: &str,
        failed_spec: bool,
    ) -> (Vec<ContainerView>, InitProgress) {
        let init = self.init_progress(inits, policy);
        let views: Vec<ContainerView> = specs
            .iter()
            .filter_map(|c| self.slots.get(&c.name).map(ContainerSlot::view))
            .map(|mut v| {
                // Not started because the init containers are not through yet.
                let fresh = v.last_termination.is_none()
                    && matches!(&v.state, RuntimeState::Waiting { reason, .. } if reason == "ContainerCreating");
                if init != InitProgress::Done && fresh {
                    v.state = RuntimeState::Waiting {
                        reason: "PodInitializing".into(),
                        message: None,
                    };
                }
                v
            })
            .collect();
        let phase = status::pod_phase(policy, init, &views);
        if !self.terminal && status::is_terminal(phase) && !failed_spec {
            tracing::info!(pod = %self.key, phase, "pod finished, releasing its network");
            self.terminal = true;
            self.stop_containers(Duration::ZERO).await;
            self.release_sandbox().await;
        } else if self.terminal && self.sandbox.is_some() {
            // An earlier release failed: retry.
            self.release_sandbox().await;
        }
        (views, init)
    }

    /// A finished pod keeps reporting the IPs it had (as a real kubelet does).
    fn last_known_ips(&self, pod: &Pod) -> Option<Vec<IpAddr>> {
        if !self.terminal {
            return None;
        }
        let ips = self
            .last_sent
            .as_ref()
            .or(pod.status.as_ref())?
            .pod_ips
            .as_ref()?;
        Some(ips.iter().filter_map(|p| p.ip.parse().ok()).collect())
    }

    async fn ensure_sandbox(&mut self, pod: &Pod) {
        if self.sandbox.is_some() || Instant::now() < self.sandbox_next {
            return;
        }
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        if host_network {
            match self.ctx.sandboxes.create_host(&self.key, self.ctx.node_ip) {
                Ok(record) => self.sandbox = Some(record),
                Err(e) => {
                    tracing::warn!(pod = %self.key, error = %e, "host-network sandbox failed");
                    self.sandbox_next = Instant::now() + SANDBOX_BACKOFF_MAX;
                }
            }
            return;
        }
        let network = self.ctx.network.borrow().clone();
        let config = match (network.ready, network.config) {
            (true, Some(c)) => c,
            _ => {
                let message = format!(
                    "network is not ready: {}",
                    network::not_ready_message(&network.message)
                );
                self.event(EventRecord::warning("NetworkNotReady", message))
                    .await;
                self.sandbox_next = Instant::now() + Duration::from_secs(5);
                return;
            }
        };
        let caps = cni::capability_args_for_pod(pod);
        match self.ctx.sandboxes.create(&self.key, &config, caps).await {
            Ok(record) => {
                tracing::info!(pod = %self.key, netns = %record.netns, ips = ?record.ips, "sandbox ready");
                self.sandbox_attempts = 0;
                self.sandbox = Some(record);
            }
            Err(e) => {
                tracing::warn!(pod = %self.key, error = %e, "sandbox creation failed");
                self.event(EventRecord::warning(
                    "FailedCreatePodSandBox",
                    format!("Failed to create pod sandbox: rpc error: code = Unknown desc = {e}"),
                ))
                .await;
                let delay =
                    containers::restart_backoff(self.sandbox_attempts).min(SANDBOX_BACKOFF_MAX);
                self.sandbox_attempts = self.sandbox_attempts.saturating_add(1);
                self.sandbox_next = Instant::now() + delay;
            }
        }
    }

    /// Starts, restarts and probes `containers`, each with its restart policy.
    async fn sync_containers(
        &mut self,
        pod: &Pod,
        containers: &[(&Container, &str)],
        sandbox: &SandboxRecord,
    ) {
        let now = Instant::now();
        let pod_ip = sandbox.ips.first().copied();
        let env_ctx = EnvContext {
            pod_ip: pod_ip.map(|ip| ip.to_string()),
            host_ip: self.ctx.node_ip.to_string(),
            node_name: self.ctx.node_name.clone(),
            path: self.ctx.path.clone(),
        };
        let dir = self.pod_dir();
        for &(spec, policy) in containers {
            let Some(slot) = self.slots.get_mut(&spec.name) else {
                continue;
            };
            // Exited: decide about a restart.
            if let RuntimeState::Terminated(t) = &slot.state {
                if !should_restart(policy, t.exit_code) {
                    continue;
                }
                let ran_long = slot
                    .started_instant
                    .is_some_and(|s| now.duration_since(s) >= containers::BACKOFF_RESET_AFTER);
                if ran_long {
                    slot.backoff_step = 0;
                }
                let delay = containers::restart_backoff(slot.backoff_step);
                slot.backoff_step = slot.backoff_step.saturating_add(1);
                slot.next_start = now + delay;
                slot.last_termination = Some(t.clone());
                slot.state = RuntimeState::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: Some(format!(
                        "back-off {}s restarting failed container={} pod={}_{}({})",
                        delay.as_secs(),
                        spec.name,
                        self.key.name,
                        self.key.namespace,
                        self.key.uid
                    )),
                };
                let message = format!("Back-off restarting failed container {}", spec.name);
                let _ = self
                    .api
                    .record_event(&self.key, EventRecord::warning("BackOff", message))
                    .await;
                continue;
            }
            if let RuntimeState::Waiting { .. } = slot.state {
                if now < slot.next_start {
                    continue;
                }
                Self::start_container(
                    &*self.api,
                    &self.key,
                    &self.exits_tx,
                    &dir,
                    sandbox.netns_name(),
                    pod,
                    spec,
                    slot,
                    &env_ctx,
                )
                .await;
                continue;
            }
            // Running: probes when due.
            if let Some((spec_p, state)) = &mut slot.probe {
                if now >= state.next_at {
                    let ok =
                        probes::run_probe(spec_p, pod_ip, sandbox.netns_name(), &slot.env).await;
                    state.record(ok, spec_p, Instant::now());
                    if !ok {
                        let event = EventRecord::warning("Unhealthy", "Readiness probe failed");
                        let _ = self.api.record_event(&self.key, event).await;
                    }
                }
            }
            let mut kill = false;
            if let Some((spec_p, state)) = &mut slot.liveness {
                if now >= state.next_at {
                    let ok =
                        probes::run_probe(spec_p, pod_ip, sandbox.netns_name(), &slot.env).await;
                    state.record(ok, spec_p, Instant::now());
                    if !ok {
                        let event = EventRecord::warning("Unhealthy", "Liveness probe failed");
                        let _ = self.api.record_event(&self.key, event).await;
                    }
                    kill = !state.passing;
                }
            }
            if kill {
                // As the kubelet: stop it with the pod's grace period; the exit then restarts
                // it per restartPolicy.
                slot.liveness = None;
                let message = format!(
                    "Container {} failed liveness probe, will be restarted",
                    spec.name
                );
                let _ = self
                    .api
                    .record_event(&self.key, EventRecord::normal("Killing", message))
                    .await;
                let grace = grace_period(Some(pod), self.ctx.max_grace);
                let record = ContainerRecord {
                    pid: slot.pid,
                    start_ticks: slot.start_ticks,
                    ..Default::default()
                };
                containers::signal_group(record.pid, record.start_ticks, Signal::SIGTERM);
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    containers::signal_group(record.pid, record.start_ticks, Signal::SIGKILL);
                });
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn start_container(
        api: &A,
        key: &PodKey,
        exits_tx: &mpsc::UnboundedSender<Exit>,
        dir: &std::path::Path,
        netns_name: Option<&str>,
        pod: &Pod,
        spec: &Container,
        slot: &mut ContainerSlot,
        env_ctx: &EnvContext,
    ) {
        let fail = |slot: &mut ContainerSlot, reason: &str, message: String| {
            slot.state = RuntimeState::Waiting {
                reason: reason.into(),
                message: Some(message),
            };
            slot.next_start = Instant::now() + containers::restart_backoff(slot.backoff_step);
            slot.backoff_step = slot.backoff_step.saturating_add(1);
        };
        let (launch, warnings) = match containers::plan_launch(pod, spec, env_ctx) {
            Ok(l) => l,
            Err(e) => {
                let msg = e.to_string();
                fail(slot, "CreateContainerConfigError", msg.clone());
                let _ = api
                    .record_event(key, EventRecord::warning("Failed", format!("Error: {msg}")))
                    .await;
                return;
            }
        };
        for w in warnings {
            tracing::warn!(pod = %key, "{w}");
        }
        if let Err(e) = std::fs::create_dir_all(dir) {
            fail(
                slot,
                "RunContainerError",
                format!("pod dir {}: {e}", dir.display()),
            );
            return;
        }
        let log = containers::log_path(dir, &spec.name);
        let spawned = match containers::spawn(&launch, netns_name, &log) {
            Ok(s) => s,
            Err(e) => {
                let msg = e.to_string();
                fail(slot, "RunContainerError", msg.clone());
                let _ = api
                    .record_event(key, EventRecord::warning("Failed", format!("Error: {msg}")))
                    .await;
                return;
            }
        };
        let restarted = slot.last_termination.is_some()
            || matches!(slot.state, RuntimeState::Waiting { ref reason, .. } if reason == "CrashLoopBackOff");
        if restarted {
            slot.restart_count = slot.restart_count.saturating_add(1);
        }
        let now = Timestamp::now();
        slot.pid = spawned.pid;
        slot.start_ticks = spawned.start_ticks;
        slot.started_at = Some(now);
        slot.started_instant = Some(Instant::now());
        slot.adopted = false;
        slot.generation = slot.generation.wrapping_add(1);
        slot.state = RuntimeState::Running { started_at: now };
        slot.env = launch.env.clone();
        slot.probe = probe_for(spec, spec.readiness_probe.as_ref(), false, key);
        slot.liveness = probe_for(spec, spec.liveness_probe.as_ref(), true, key);
        containers::write_record(dir, &spec.name, &slot.record());
        tracing::info!(pod = %key, container = %spec.name, pid = spawned.pid, "container started");
        let tx = exits_tx.clone();
        let container = spec.name.clone();
        let generation = slot.generation;
        let mut child = spawned.child;
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await {
                let _ = tx.send(Exit {
                    container,
                    generation,
                    status,
                });
            }
        });
        let _ = api
            .record_event(
                key,
                EventRecord::normal("Started", format!("Started container {}", spec.name)),
            )
            .await;
    }

    /// SIGTERM to every running container's group, SIGKILL after `grace`.
    async fn stop_containers(&mut self, grace: Duration) {
        let pids: Vec<(i32, u64)> = self
            .slots
            .values()
            .filter(|s| s.running() && s.pid > 0)
            .map(|s| (s.pid, s.start_ticks))
            .collect();
        for (pid, ticks) in &pids {
            containers::signal_group(*pid, *ticks, Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && pids.iter().any(|(p, t)| containers::group_alive(*p, *t))
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (pid, ticks) in &pids {
            containers::signal_group(*pid, *ticks, Signal::SIGKILL);
        }
        // Let the exit watchers reap them, then record the exits.
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until && self.slots.values().any(|s| s.running() && !s.adopted) {
            match tokio::time::timeout(Duration::from_millis(100), self.exits_rx.recv()).await {
                Ok(Some(exit)) => self.handle_exit(exit),
                Ok(None) => break,
                Err(_) => {}
            }
        }
        self.poll_adopted();
    }

    async fn release_sandbox(&mut self) {
        if let Some(record) = self.sandbox.take() {
            let config = self.ctx.network.borrow().config.clone();
            if let Err(e) = self
                .ctx
                .sandboxes
                .teardown(&record, config.as_deref())
                .await
            {
                tracing::warn!(pod = %self.key, error = %e, "sandbox teardown failed");
                self.event(EventRecord::warning(
                    "FailedKillPod",
                    format!("error killing pod: {e}"),
                ))
                .await;
                // Keep it: the next sync or the final teardown retries.
                self.sandbox = Some(record);
            }
        }
    }

    /// Stops everything and removes the pod (from the node, then from the API). Returns false if
    /// the kubelet is shutting down meanwhile.
    async fn terminate(&mut self, pod: Option<&Pod>) -> bool {
        let grace = grace_period(pod, self.ctx.max_grace);
        if pod.is_some() {
            let names: Vec<String> = self
                .slots
                .values()
                .filter(|s| s.running())
                .map(|s| s.name.clone())
                .collect();
            for name in names {
                self.event(EventRecord::normal(
                    "Killing",
                    format!("Stopping container {name}"),
                ))
                .await;
            }
        }
        self.stop_containers(grace).await;
        // A record on disk without a live sandbox (e.g. a failed ADD) still needs its DEL.
        if self.sandbox.is_none() {
            self.sandbox = self.ctx.sandboxes.read_record(&self.key);
        }
        let mut attempt = 0u32;
        loop {
            let config = self.ctx.network.borrow().config.clone();
            let result = match &self.sandbox {
                Some(record) => self.ctx.sandboxes.teardown(record, config.as_deref()).await,
                None => Ok(()),
            };
            match result {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(pod = %self.key, error = %e, "teardown failed, retrying");
                    if pod.is_some() {
                        self.event(EventRecord::warning(
                            "FailedKillPod",
                            format!("error killing pod: {e}"),
                        ))
                        .await;
                    }
                    let delay = containers::restart_backoff(attempt);
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        changed = self.pod_rx.changed() => if changed.is_err() { return false; },
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.sandbox = None;
        self.ctx.sandboxes.remove_pod_dir(&self.key);
        if pod.is_some() {
            if let Err(e) = self.api.delete_pod(&self.key).await {
                tracing::warn!(pod = %self.key, error = %e, "final delete failed");
            }
        }
        tracing::info!(pod = %self.key, "pod torn down");
        true
    }

    async fn report(&mut self, pod: &Pod, view: &PodView) {
        let previous = self.last_sent.clone().or_else(|| pod.status.clone());
        let new = status::build_status(pod, view, previous.as_ref(), Timestamp::now());
        let rv = pod.metadata.resource_version.clone();
        let changed_since_sent = self
            .last_sent
            .as_ref()
            .is_none_or(|s| !status::same_status(s, &new));
        // Someone else wrote the status after us (or we restarted): bring it back.
        let overwritten = rv != self.rv_at_send
            && pod
                .status
                .as_ref()
                .is_none_or(|s| !status::same_status(s, &new));
        if !changed_since_sent && !overwritten {
            return;
        }
        match self
            .api
            .patch_status(&self.key, status::status_patch(&new))
            .await
        {
            Ok(()) => {
                self.last_sent = Some(new);
                self.rv_at_send = rv;
            }
            Err(e) => tracing::warn!(pod = %self.key, error = %e, "status update failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_is_capped_and_defaults() {
        let cap = Duration::from_secs(10);
        assert_eq!(grace_period(None, cap), cap);
        let mut pod = Pod::default();
        pod.metadata.deletion_grace_period_seconds = Some(2);
        assert_eq!(grace_period(Some(&pod), cap), Duration::from_secs(2));
        pod.metadata.deletion_grace_period_seconds = Some(-5);
        assert_eq!(grace_period(Some(&pod), cap), Duration::ZERO);
        pod.metadata.deletion_grace_period_seconds = Some(600);
        assert_eq!(grace_period(Some(&pod), cap), cap);
    }

    #[test]
    fn restart_policies() {
        assert!(should_restart("Always", 0));
        assert!(should_restart("OnFailure", 1));
        assert!(!should_restart("OnFailure", 0));
        assert!(!should_restart("Never", 1));
    }
}
