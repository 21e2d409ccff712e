//! The agent's NetworkPolicy enforcer: watch → [`ClusterState`] → compile → one nft transaction,
//! plus the CNI admission socket, the flow log and the per-policy counters.
//!
//! - `attachments`: what the plugin reported at ADD (host veth, MAC, IP), persisted in the run dir.
//! - `state`: watch caches + attachments → the compiler's input (pure).
//! - `server`: the admission socket `<runDir>/agent.sock` (protocol in `veilnet_cni::agent_protocol`).
//! - `status`: counters banked across ruleset changes; the status is held in a `watch` channel
//!   the metrics endpoint reads ([`PolicyAgent::status_feed`]) and written to
//!   `<runDir>/policy-status.json` for `veilnet status`, a separate process.
//! - `flowlog`: NFLOG group 100 → JSON lines in `<runDir>/flows.jsonl`.
//!
//! # The loop
//!
//! Pods, Namespaces and NetworkPolicies are watched by reflectors that wake one `Notify`, as do
//! admissions. After a wake the loop waits a few milliseconds to coalesce a burst, then rebuilds the
//! whole state from the caches (never from single events, so nothing is missed or replayed twice;
//! objects that did not change keep their conversion, see `state::StateCache`), compiles it for
//! this node, renders it against the ruleset in the kernel and hands the difference to `nft -f -`
//! on a blocking thread: one atomic transaction per change, skipped when nothing changed. A label
//! change therefore reaches the kernel within the debounce plus one sync (tens of milliseconds at
//! 1,000 policies × 5,000 pods), well inside a second.
//!
//! # No race at pod start
//!
//! ADD creates the veth with its host end down and asks the agent over the socket. The agent adds
//! the attachment (so it does not wait for the pod's IP to reach the API), syncs, and answers
//! `admitted` once an applied generation holds the pod's anti-spoofing port with its IPs — its
//! policy chains are compiled in the same generation. Only then does the plugin bring the link up.
//! Frames from `veil*` ports the ruleset does not know are dropped
//! (`CompileOptions::drop_unknown_pod_ports`), which also covers a pod whose report got lost.
//!
//! Writing `<runDir>/policy-admission.json` before the node state turns ready makes every later
//! ADD on this node ask the agent, and fail closed when it cannot.

pub mod attachments;
pub mod flowlog;
pub mod paths;
pub mod server;
pub mod state;
pub mod status;

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::Api;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use veilnet_cni::agent_protocol::AdmissionConfig;

use crate::netfilter::conntrack::ConntrackSocket;
use crate::policy::{
    compile_with, enable_bridge_netfilter, render, ApplyOutcome, CompileOptions, NftApplier,
    PolicyError,
};
use attachments::Attachments;
use state::{IpIndex, StateCache};
use status::{CounterBank, CounterSnapshot, PolicyStatus};

/// File names under the run dir.
pub const STATUS_FILE: &str = "policy-status.json";
pub const FLOW_LOG_FILE: &str = "flows.jsonl";
pub const ATTACHMENTS_DIR: &str = "attachments";

/// Coalesces a burst of watch events into one sync.
const DEBOUNCE: Duration = Duration::from_millis(10);
/// Bounds each receive of the strict mode's conntrack dump.
pub(super) const CONNTRACK_TIMEOUT: Duration = Duration::from_secs(2);
/// Counters, status file and attachment pruning.
const HOUSEKEEPING: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PolicyAgentError {
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admission socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("enforcer: {0}")]
    Kernel(#[from] PolicyError),
}

/// What the enforcer needs to know about its node.
#[derive(Clone, Debug)]
pub struct PolicyOptions {
    pub node: String,
    pub run_dir: PathBuf,
    /// The node's own addresses (underlay, bridge gateways): their traffic is never filtered.
    pub node_addrs: Vec<IpAddr>,
    /// JSON lines of logged verdicts; `None` disables the NFLOG reader.
    pub flow_log: Option<PathBuf>,
    /// Also log (rate-limited) connections that a policy allowed.
    pub log_allowed: bool,
    /// The admission socket's connection cap (`crate::listen`).
    pub admission_cap: Arc<crate::listen::ConnLimit>,
    /// `policyStrictMode`: after each ruleset change, cut the established connections the new
    /// policy denies (their conntrack entries are deleted, see `crate::policy::conntrack`).
    pub strict_mode: bool,
    /// This node's pod CIDRs: only admitted pods' addresses in them are forwarded to
    /// (`CompileOptions::local_pod_cidrs`).
    pub pod_cidrs: Vec<IpNet>,
    /// Trusted DNS (`dnsMode`, `trustedDns`).
    pub dns: crate::dns::DnsGuard,
    /// Network anomaly alerts (the config file's `alerts`).
    pub alerts: crate::agent::alerts::AlertConfig,
}

/// At most this many CNI ADDs wait on the admission socket at once (a node runs at most ~110
/// pods; each ADD holds its connection for at most the plugin's 5 s). One more is closed at once:
/// that ADD fails and the kubelet retries it.
pub const ADMISSION_MAX_CONNECTIONS: usize = 128;

impl PolicyOptions {
    /// From the agent's flags: `--flow-log` (default `<runDir>/flows.jsonl`, `off` disables),
    /// `--flow-log-allowed`.
    pub fn from_agent(
        args: &crate::agent::AgentArgs,
        cfg: &crate::agent::AgentConfig,
        underlay_ip: IpAddr,
        pod_cidrs: &[IpNet],
    ) -> PolicyOptions {
        let mut node_addrs = vec![underlay_ip];
        node_addrs.extend(pod_cidrs.iter().map(crate::model::overlay::gateway_address));
        let flow_log = match &args.flow_log {
            Some(p) if p.as_os_str() == "off" => None,
            Some(p) => Some(p.clone()),
            None => Some(cfg.run_dir.join(FLOW_LOG_FILE)),
        };
        PolicyOptions {
            node: cfg.node_name.clone(),
            run_dir: cfg.run_dir.clone(),
            node_addrs,
            flow_log,
            log_allowed: args.flow_log_allowed,
            admission_cap: crate::listen::ConnLimit::new("admission", ADMISSION_MAX_CONNECTIONS),
            strict_mode: cfg.policy_strict_mode,
            pod_cidrs: pod_cidrs.to_vec(),
            dns: cfg.dns.clone(),
            alerts: cfg.alerts.clone(),
        }
    }

    fn compile_options(&self) -> CompileOptions {
        CompileOptions {
            log_allowed: self.log_allowed,
            drop_unknown_pod_ports: true,
            tcp_new_needs_syn: self.strict_mode,
            local_pod_cidrs: self.pod_cidrs.clone(),
            dns: self.dns.clone(),
            // Nothing reads the watched pods' lines without alerts (or without the flow log).
            egress_watch: self.alerts.enabled && self.flow_log.is_some(),
            ..CompileOptions::default()
        }
    }
}

/// The last ruleset in the kernel: which pod ports (host veth, IP) it guards.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    pub generation: u64,
    pub ports: HashSet<(String, IpAddr)>,
}

/// State shared by the loop, the admission server and the flow log.
pub struct Shared {
    pub options: PolicyOptions,
    pub attachments: Mutex<Attachments>,
    pub wake: Arc<Notify>,
    pub applied: watch::Sender<Applied>,
    pub index: RwLock<Arc<IpIndex>>,
    /// The enforcer's status: read in memory by the metrics endpoint ([`PolicyAgent::status_feed`])
    /// and written to `<runDir>/policy-status.json` for `veilnet status`, another process.
    pub status: watch::Sender<PolicyStatus>,
    pub pods: Store<Pod>,
    namespaces: Store<Namespace>,
    policies: Store<NetworkPolicy>,
    /// Network anomaly alerts (`None`: disabled in the config).
    pub alerts: Option<crate::agent::alerts::Alerts>,
    /// The node agent's latest view of its pairs (the flow log's `nodes`, `path`, `encrypted`).
    pairs: RwLock<Arc<paths::PairPaths>>,
}

impl Shared {
    /// The latest pairs the node agent handed over (see [`PolicyAgent::set_pairs`]).
    pub fn pairs(&self) -> Arc<paths::PairPaths> {
        self.pairs
            .read()
            .map(|p| p.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Judges one observation for alerts, and counts an alert it raises in the status (the
    /// metric `veilnet_alerts_total`).
    pub fn observe(&self, obs: crate::agent::alerts::Observation<'_>) {
        let Some(alerts) = &self.alerts else {
            return;
        };
        if let Some(alert) = alerts.observe(obs) {
            self.status.send_modify(|s| {
                *s.alerts.entry(alert.kind.as_str().to_string()).or_default() += 1;
            });
        }
    }
}

/// What the kernel side keeps between syncs (used from blocking threads only). The applier holds
/// the ruleset in the kernel: the next one is rendered against it and sent as a delta.
struct Kernel {
    applier: NftApplier,
    bank: CounterBank,
}

/// A running enforcer. Dropping it stops the tasks; the ruleset stays in the kernel (as the rest
/// of the dataplane does while the agent restarts), and ADD fails closed until an agent answers.
pub struct PolicyAgent {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    flow_log: Option<flowlog::FlowLogHandle>,
}

impl PolicyAgent {
    /// Starts enforcing: br_netfilter on, admission config written, socket bound (all before
    /// returning, so before the node turns ready), then the watch loop in the background.
    pub async fn start(
        client: kube::Client,
        options: PolicyOptions,
    ) -> Result<PolicyAgent, PolicyAgentError> {
        enable_bridge_netfilter(None)?;
        let (attachments, problems) = Attachments::load(&options.run_dir.join(ATTACHMENTS_DIR));
        for p in problems {
            tracing::warn!(problem = %p, "dropped a pod attachment record");
        }
        tracing::info!(
            attachments = attachments.len(),
            "NetworkPolicy enforcer starting"
        );
        let wake = Arc::new(Notify::new());
        let (pods, pods_task) = crate::agent::watch::spawn_reflector(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default(),
            wake.clone(),
        );
        let (namespaces, ns_task) = crate::agent::watch::spawn_reflector(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            wake.clone(),
        );
        let (policies, np_task) = crate::agent::watch::spawn_reflector(
            Api::<NetworkPolicy>::all(client.clone()),
            watcher::Config::default(),
            wake.clone(),
        );
        let (alerts, alerts_task) = if options.alerts.enabled {
            let (a, task) = crate::agent::alerts::Alerts::start(
                options.alerts.clone(),
                client,
                &options.node,
                options.run_dir.clone(),
                pods.clone(),
            );
            (Some(a), Some(task))
        } else {
            tracing::info!("network anomaly alerts: off");
            (None, None)
        };
        match (options.dns.mode, options.dns.active()) {
            (crate::dns::DnsMode::Off, _) => tracing::info!("trusted DNS: off"),
            (mode, false) => tracing::warn!(
                %mode,
                "trusted DNS is inactive: no trustedDns configured, so no query can be told \
                 trusted from untrusted (set trustedDns to the cluster DNS Service and its endpoints)"
            ),
            (mode, true) => tracing::info!(%mode, trusted = ?options.dns.trusted, "trusted DNS"),
        }
        let shared = Arc::new(Shared {
            status: watch::channel(PolicyStatus {
                node: options.node.clone(),
                ..Default::default()
            })
            .0,
            options,
            attachments: Mutex::new(attachments),
            wake,
            applied: watch::channel(Applied::default()).0,
            index: RwLock::new(Arc::new(IpIndex::default())),
            pairs: RwLock::new(Arc::new(paths::PairPaths::default())),
            pods,
            namespaces,
            policies,
            alerts,
        });
        let listener = server::bind(&shared.options.run_dir)?;
        let config = AdmissionConfig::new(&shared.options.run_dir);
        config
            .write(&shared.options.run_dir)
            .map_err(|source| PolicyAgentError::Write {
                path: AdmissionConfig::path_in(&shared.options.run_dir),
                source,
            })?;
        let flow_log = match &shared.options.flow_log {
            Some(path) => match flowlog::spawn(shared.clone(), path.clone()) {
                Ok(h) => Some(h),
                Err(e) => {
                    // Visibility, not enforcement: run without it rather than not at all.
                    tracing::error!(error = %e, "flow log disabled");
                    None
                }
            },
            None => None,
        };
        let mut tasks = vec![
            pods_task,
            ns_task,
            np_task,
            tokio::spawn(server::serve(
                listener,
                shared.clone(),
                config.timeout(),
                shared.options.admission_cap.clone(),
            )),
            tokio::spawn(run_loop(shared.clone())),
        ];
        tasks.extend(alerts_task);
        Ok(PolicyAgent {
            shared,
            tasks,
            flow_log,
        })
    }

    /// The node's counters as of the last housekeeping pass (at most a few seconds old), for the
    /// metrics endpoint.
    pub fn counters(&self) -> CounterSnapshot {
        self.shared.status.borrow().counters.clone()
    }

    /// The current status (what `policy-status.json` holds).
    pub fn status(&self) -> PolicyStatus {
        self.shared.status.borrow().clone()
    }

    /// Hands over the node agent's latest pairs, after each pass (cheap when nothing changed).
    pub fn set_pairs(&self, pairs: paths::PairPaths) {
        let mut slot = self.shared.pairs.write().unwrap_or_else(|e| e.into_inner());
        if **slot != pairs {
            *slot = Arc::new(pairs);
        }
    }

    /// Where the flow log is written (`None`: off).
    pub fn flow_log_path(&self) -> Option<PathBuf> {
        self.flow_log.as_ref()?;
        self.shared.options.flow_log.clone()
    }

    /// A handle on the pairs, for the flows endpoint's source check.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The status as it changes, for the metrics endpoint in this process (no file read back).
    pub fn status_feed(&self) -> watch::Receiver<PolicyStatus> {
        self.shared.status.subscribe()
    }
}

impl Drop for PolicyAgent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(f) = self.flow_log.take() {
            f.stop();
        }
    }
}

/// `--no-policy`: stop asking ADD to wait for the agent and remove veilnet's ruleset.
pub async fn disable(run_dir: &Path) -> Result<(), PolicyAgentError> {
    AdmissionConfig::remove(run_dir).map_err(|source| PolicyAgentError::Write {
        path: AdmissionConfig::path_in(run_dir),
        source,
    })?;
    tokio::task::spawn_blocking(|| NftApplier::new(None).remove())
        .await
        .map_err(|e| PolicyError::Json(format!("nft task: {e}")))??;
    for family in ["inet", "bridge"] {
        crate::netfilter::applied::forget(run_dir, family, crate::policy::TABLE);
    }
    Ok(())
}

/// Locks a std mutex, recovering from poisoning (a panicked holder leaves consistent data here:
/// every critical section is a plain read or replace).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn run_loop(shared: Arc<Shared>) {
    // Until every cache has listed once, a sync would drop pods and policies it has not seen yet.
    let _ = shared.pods.wait_until_ready().await;
    let _ = shared.namespaces.wait_until_ready().await;
    let _ = shared.policies.wait_until_ready().await;
    let kernel = Arc::new(Mutex::new(Kernel {
        applier: NftApplier::new(None),
        bank: CounterBank::default(),
    }));
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The compiler's input, rebuilt on every sync from the caches but reusing what did not change.
    let mut states = StateCache::default();
    let mut failures: u32 = 0;
    let mut dirty = true;
    loop {
        if dirty {
            match sync(&shared, &kernel, &mut states).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    tracing::error!(error = %e, failures, "policy sync failed; retrying");
                    let error = e.to_string();
                    shared.status.send_modify(|s| {
                        s.last_error = Some(error);
                        s.sync_errors = s.sync_errors.saturating_add(1);
                    });
                }
            }
        }
        let retry = Duration::from_millis(200 * u64::from(failures.min(25)));
        tokio::select! {
            _ = shared.wake.notified() => {
                tokio::time::sleep(DEBOUNCE).await;
                dirty = true;
            }
            _ = housekeeping.tick() => {
                dirty = housekeep(&shared, &kernel).await;
            }
            _ = tokio::time::sleep(retry), if failures > 0 => dirty = true,
        }
    }
}

/// One full pass: caches → state → model → kernel.
async fn sync(
    shared: &Arc<Shared>,
    kernel: &Arc<Mutex<Kernel>>,
    states: &mut StateCache,
) -> Result<(), PolicyError> {
    let start = Instant::now();
    let opts = &shared.options;
    let state = {
        let attachments = lock(&shared.attachments);
        states.update(
            &shared.pods.state(),
            &shared.namespaces.state(),
            &shared.policies.state(),
            &attachments,
            &opts.node,
        )
    };
    let model = compile_with(state, &opts.node, &opts.node_addrs, &opts.compile_options());
    let ports: HashSet<(String, IpAddr)> = model
        .anti_spoof
        .iter()
        .flat_map(|p| p.ips.iter().map(|ip| (p.host_veth.clone(), *ip)))
        .collect();
    let summary = (
        state.policies.len(),
        model.policies.len(),
        state.pods.iter().filter(|p| p.node == opts.node).count(),
        model.chains.len(),
        model.anti_spoof.len(),
        model
            .warnings
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>(),
    );
    let kernel = kernel.clone();
    let run_dir = opts.run_dir.clone();
    let (changed, model) = tokio::task::spawn_blocking(move || {
        let mut k = lock(&kernel);
        let Kernel { applier, bank } = &mut *k;
        // Rendered against the ruleset in the kernel so that names stay put and the update is
        // the few elements and chains that changed. Counters are not read here: the applier
        // reads only those its transaction destroys (usually none) and `bank` keeps them.
        let ruleset = render(&model, applier.current());
        let outcome = applier.update(ruleset, &mut |old, destroyed| bank.bank(old, destroyed))?;
        if let Some(current) = applier.current() {
            bank.forget_gone_pods(current);
        }
        match &outcome {
            ApplyOutcome::Replaced { reason } => {
                tracing::info!(%reason, "policy ruleset replaced whole")
            }
            ApplyOutcome::Updated { operations } => {
                tracing::debug!(operations, "policy ruleset updated")
            }
            ApplyOutcome::Applied | ApplyOutcome::Unchanged => {}
        }
        Ok::<_, PolicyError>((outcome != ApplyOutcome::Unchanged, model))
    })
    .await
    .map_err(|e| PolicyError::Json(format!("nft task: {e}")))??;

    *shared.index.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(IpIndex::new(state));
    let generation = shared.applied.borrow().generation + 1;
    shared.applied.send_replace(Applied { generation, ports });
    if changed {
        // For `veilnet doctor`'s drift check: the tables as the kernel holds them after this
        // load. After the generation is out, so that no ADD waits for the listing.
        let _ = tokio::task::spawn_blocking(move || {
            for family in ["inet", "bridge"] {
                crate::netfilter::applied::record_here(&run_dir, family, crate::policy::TABLE);
            }
        })
        .await;
    }
    let elapsed = start.elapsed();
    // Strict mode, after the generation is published (an ADD waiting for it does not wait for
    // the conntrack pass): the new ruleset is in place, so what is cut now comes back as a new
    // connection and meets it. A failure leaves the connections alone (logged; the next change
    // runs the pass again).
    let cut = if opts.strict_mode && changed {
        tokio::task::spawn_blocking(move || cut_denied(&model))
            .await
            .ok()
            .flatten()
    } else {
        None
    };
    let status = update_status(shared, |s| {
        s.generation = generation;
        s.synced_at = Some(jiff::Timestamp::now().to_string());
        (
            s.policies_total,
            s.policies_local,
            s.local_pods,
            s.pod_chains,
            s.guarded_ports,
            s.warnings,
        ) = summary;
        s.last_sync_ms = elapsed.as_secs_f64() * 1000.0;
        s.last_error = None;
        if let Some(cut) = cut {
            s.connections_cut = s.connections_cut.saturating_add(cut as u64);
        }
    });
    tracing::debug!(generation, ms = status.last_sync_ms, "policy synced");
    write_status(&shared.options.run_dir, &status);
    Ok(())
}

/// Strict mode's pass over the node's conntrack table (blocking): the entries `model` denies as
/// new connections are deleted. One log line per pass; `None` if the table could not be read.
fn cut_denied(model: &crate::policy::CompiledPolicy) -> Option<usize> {
    let start = Instant::now();
    let report = ConntrackSocket::open(CONNTRACK_TIMEOUT)
        .and_then(|mut s| crate::policy::conntrack::cut(&mut s, model));
    match report {
        Ok(r) => {
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            tracing::info!(
                cut = r.cut,
                failed = r.failed,
                examined = r.examined,
                ms,
                "strict mode: established connections the new policy denies cut"
            );
            Some(r.cut)
        }
        Err(e) => {
            tracing::warn!(error = %e, "strict mode: cannot read the conntrack table; established connections stay");
            None
        }
    }
}

/// Brings a pod's bridge port to what ADD makes of it (no learning, no unknown-unicast flooding,
/// LLDP through netfilter, the pod's MAC static on the port) if it differs: ports of pods that
/// started before veilnet pinned MACs, or an admin's change. Flushes what the port learned.
fn repair_pod_port(
    nl: &mut veilnet_cni::netlink::Netlink,
    link: &veilnet_cni::netlink::Link,
    mac: &str,
) {
    use veilnet_cni::netlink::{parse_mac, pod_port_drift, BridgePortFlags};
    let Some(pod_mac) = parse_mac(mac) else {
        return;
    };
    if link.controller.is_none() {
        return; // not on the bridge (yet): nothing to pin
    }
    let static_macs = match nl.static_fdb_on(link.index) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(veth = %link.name, error = %e, "cannot read the pod port's FDB");
            return;
        }
    };
    let Some(drift) = pod_port_drift(link.port.as_ref(), &static_macs, &pod_mac) else {
        return;
    };
    let result = nl
        .set_bridge_port(link.index, &BridgePortFlags::pod_port())
        .and_then(|()| nl.replace_static_fdb(link.index, &pod_mac));
    match result {
        Ok(()) => tracing::info!(veth = %link.name, %drift, "pod bridge port repaired"),
        Err(e) => {
            tracing::warn!(veth = %link.name, %drift, error = %e, "cannot repair the pod bridge port")
        }
    }
}

/// Changes the status in memory (the metrics endpoint sees the change at once) and returns it.
fn update_status(shared: &Shared, change: impl FnOnce(&mut PolicyStatus)) -> PolicyStatus {
    shared.status.send_modify(change);
    shared.status.borrow().clone()
}

/// The status file, for `veilnet status` (a separate process; the agent itself reads memory).
fn write_status(run_dir: &Path, status: &PolicyStatus) {
    let path = run_dir.join(STATUS_FILE);
    if let Err(e) = status.write(&path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the policy status");
    }
}

/// Refreshes counters and the status file, forgets attachments whose veth is gone (the pod
/// was deleted) and repairs the bridge ports of the others ([`repair_pod_port`]). Returns whether
/// a sync is due.
async fn housekeep(shared: &Arc<Shared>, kernel: &Arc<Mutex<Kernel>>) -> bool {
    let candidates: Vec<(String, String)> = lock(&shared.attachments)
        .iter()
        .map(|a| (a.host_veth.clone(), a.mac.clone()))
        .collect();
    let kernel = kernel.clone();
    let result = tokio::task::spawn_blocking(move || {
        let gone: Vec<String> = match veilnet_cni::netlink::Netlink::open() {
            Ok(mut nl) => candidates
                .into_iter()
                .filter(|(veth, mac)| match nl.link_by_name(veth) {
                    Ok(None) => true,
                    Ok(Some(link)) => {
                        repair_pod_port(&mut nl, &link, mac);
                        false
                    }
                    Err(_) => false,
                })
                .map(|(veth, _)| veth)
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut k = lock(&kernel);
        let mut tables_gone = Vec::new();
        let counters = match (k.applier.current(), k.applier.counters()) {
            (Some(ruleset), Ok(c)) => {
                tables_gone = tables_without_counters(&c);
                Some(k.bank.snapshot(ruleset, &c))
            }
            _ => None,
        };
        if !tables_gone.is_empty() {
            // Someone deleted a table (`nft delete table`, a flush of the whole ruleset): the
            // applier's memory no longer matches the kernel. Forget it so the next sync loads
            // both tables whole, instead of enforcing nothing until the agent restarts.
            k.applier.forget();
        }
        (gone, counters, tables_gone)
    })
    .await;
    let Ok((gone, counters, tables_gone)) = result else {
        return false;
    };
    for family in &tables_gone {
        tracing::warn!(
            table = %format!("{family} {}", crate::policy::TABLE),
            "the policy table is gone from the kernel; loading it again"
        );
    }
    let removed = if gone.is_empty() {
        Vec::new()
    } else {
        lock(&shared.attachments).retain(|a| !gone.contains(&a.host_veth))
    };
    for a in &removed {
        tracing::info!(pod = %format!("{}/{}", a.namespace, a.name), veth = %a.host_veth, "pod interface gone; attachment forgotten");
    }
    if let Some(c) = &counters {
        observe_dns_counters(shared, &c.dns);
    }
    let status = update_status(shared, |s| {
        if let Some(c) = counters {
            s.counters = c;
        }
    });
    write_status(&shared.options.run_dir, &status);
    !removed.is_empty() || !tables_gone.is_empty()
}

/// Each watched pod's DNS counters, for the NXDOMAIN-share and rate alerts.
fn observe_dns_counters(shared: &Shared, dns: &[status::DnsCounter]) {
    let mut per_pod: std::collections::BTreeMap<crate::policy::ObjectRef, (u64, u64)> =
        Default::default();
    for c in dns {
        let entry = per_pod
            .entry(crate::policy::ObjectRef::new(&c.namespace, &c.pod))
            .or_default();
        match c.server.as_str() {
            "nxdomain" => entry.1 += c.queries,
            _ => entry.0 += c.queries,
        }
    }
    for (pod, (queries, nxdomain)) in &per_pod {
        shared.observe(crate::agent::alerts::Observation::DnsCounters {
            pod,
            queries: *queries,
            nxdomain: *nxdomain,
        });
    }
}

/// The families of veilnet's policy tables that hold none of their named counters: each table
/// always holds one (`deny_ingress` in inet, `spoofed` in bridge), so a family without any has
/// lost its table.
fn tables_without_counters(counters: &[crate::netfilter::CounterValue]) -> Vec<&'static str> {
    ["inet", "bridge"]
        .into_iter()
        .filter(|family| !counters.iter().any(|c| c.family == *family))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::CounterValue;

    fn counter(family: &str, name: &str) -> CounterValue {
        CounterValue {
            family: family.into(),
            name: name.into(),
            packets: 0,
            bytes: 0,
        }
    }

    #[test]
    fn a_family_without_its_counters_has_lost_its_table() {
        let both = [
            counter("inet", "deny_ingress"),
            counter("bridge", "spoofed"),
        ];
        assert!(tables_without_counters(&both).is_empty());
        assert_eq!(
            tables_without_counters(&[counter("inet", "deny_ingress")]),
            ["bridge"]
        );
        assert_eq!(tables_without_counters(&[]), ["inet", "bridge"]);
    }
}
