//! The per-node agent (`veilnet agent`): watches the cluster, plans the node's dataplane and applies
//! it.
//!
//! - `config`: flags, environment and config file, resolved and validated once.
//! - `underlay`: the interface carrying this node's address.
//! - `watch`: reflectors feeding the planners.
//! - `snapshot`: one typed record per Node, built once per pass.
//! - `plan`: the pure planner from a snapshot to the node's whole desired state.
//! - `reconcile`: the loop (snapshot → plan → apply), generic over what it writes to (`ports`).
//! - `cni_config`: the node state file and conflist for `veilnet-cni`.
//! - `events`: Kubernetes Events for what the agent refuses.
//!
//! On SIGTERM the agent exits and leaves the dataplane in place, so pod traffic keeps flowing while
//! it is upgraded or restarted; the next agent adopts the existing links without recreating them.

pub mod alerts;
pub mod cni_config;
pub mod config;
pub mod events;
#[cfg(test)]
mod fakes;
pub mod flows;
pub mod health;
pub mod metrics;
pub mod plan;
pub mod policy;
pub mod ports;
pub mod reconcile;
pub mod snapshot;
pub mod status;
pub mod underlay;
pub mod watch;
pub mod wireguard;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::runtime::watcher;
use kube::Api;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;

use crate::cluster::podcidr;
use crate::kernel::netlink::NetlinkKernel;
use crate::kernel::{sysctl, KernelError};
pub use config::{AgentArgs, AgentConfig};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("kubernetes client: {0}")]
    Client(String),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("kernel: {0}")]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Underlay(#[from] underlay::UnderlayError),
    #[error(transparent)]
    PodCidr(#[from] podcidr::PodCidrError),
    #[error("signal handling: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    WireGuard(#[from] wireguard::WireGuardError),
    #[error(transparent)]
    Health(#[from] health::HealthError),
    #[error("NetworkPolicy: {0}")]
    Policy(#[from] policy::PolicyAgentError),
}

/// Identifies the agent in Events.
pub const COMPONENT: &str = "veilnet-agent";

async fn client(cfg: &AgentConfig) -> Result<kube::Client, AgentError> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| AgentError::Client(format!("reading {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| AgentError::Client(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| AgentError::Client(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(AgentError::Kube)
}

/// Waits for this node's Node object and returns it (the kubelet registers it).
async fn own_node(api: &Api<Node>, name: &str) -> Result<Node, AgentError> {
    let mut logged = false;
    loop {
        match api.get_opt(name).await {
            Ok(Some(node)) => return Ok(node),
            Ok(None) if !logged => {
                tracing::info!(node = name, "waiting for this node's Node object");
                logged = true;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(node = name, error = %e, "cannot read this node's Node object yet")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn internal_ip(node: &Node) -> Option<IpAddr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .find(IpAddr::is_ipv4)
}

/// How long the loop waits after a watch event before its pass (see the loop).
const WATCH_COALESCE: Duration = Duration::from_millis(10);

pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    let cfg = AgentConfig::resolve(&args)?;
    tracing::info!(node = %cfg.node_name, cluster_cidr = %cfg.cluster_cidr, "veilnet agent starting");
    // The descriptor budget (issue 23.3): the whole hard limit for the agent's own work; the
    // listeners' caps (a few hundred connections in all) stay far below it.
    match crate::listen::raise_fd_limit() {
        Ok((soft, _)) => tracing::info!(limit = soft, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
    }
    let client = client(&cfg).await?;
    let nodes_api: Api<Node> = Api::all(client.clone());
    let mut kernel = NetlinkKernel::connect()?;
    sysctl::enable_forwarding(None, false)?;

    // Who we are: the underlay address (flag, else the Node's InternalIP) and its interface.
    let mut node = own_node(&nodes_api, &cfg.node_name).await?;
    let ip = loop {
        if let Some(ip) = cfg.underlay_ip.or_else(|| internal_ip(&node)) {
            break ip;
        }
        tracing::info!("waiting for the Node's InternalIP (or pass --underlay-ip)");
        tokio::time::sleep(Duration::from_secs(1)).await;
        node = own_node(&nodes_api, &cfg.node_name).await?;
    };
    let underlay = underlay::find(&mut kernel, ip).await?;
    tracing::info!(ip = %underlay.ip, dev = %underlay.dev, mtu = underlay.mtu, "underlay");

    // Our pod CIDR: assigned by the cluster, else allocated from veilnet's shared record.
    let spec = podcidr::spec_cidrs(&node);
    let (pod_cidrs, allocated): (Vec<IpNet>, bool) = if spec.is_empty() {
        let cidr = podcidr::ensure_allocated(
            client.clone(),
            &cfg.namespace,
            &cfg.node_name,
            cfg.cluster_cidr,
            cfg.node_cidr_prefix,
        )
        .await?;
        tracing::info!(%cidr, record = podcidr::RECORD_NAME, "pod CIDR allocated");
        (vec![IpNet::V4(cidr)], true)
    } else {
        tracing::info!(cidrs = ?spec, "pod CIDR from the Node's spec");
        (spec.into_iter().map(IpNet::V4).collect(), false)
    };

    let notify = Arc::new(Notify::new());
    let (nodes, nodes_task) = watch::spawn_reflector_where(
        nodes_api,
        watcher::Config::default(),
        notify.clone(),
        watch::node_view,
        watch::prune_node,
    );
    let (records, records_task) = watch::spawn_reflector(
        Api::<ConfigMap>::namespaced(client.clone(), &cfg.namespace),
        watcher::Config::default().fields(&format!("metadata.name={}", podcidr::RECORD_NAME)),
        notify.clone(),
    );
    let _ = nodes.wait_until_ready().await;
    let _ = records.wait_until_ready().await;

    // The WireGuard device exists in every mode (a live toggle must not wait for it), with the
    // MTU of the underlay minus WireGuard's overhead.
    let wg_mtu = underlay.mtu.saturating_sub(crate::wg::OVERHEAD_IPV4);
    let socket = crate::datapath::socket_path(&cfg.run_dir);
    let wg =
        wireguard::WireGuard::start(&cfg.state_dir, &socket, cfg.wireguard_port, wg_mtu).await?;
    let dp = wg.datapath().info.as_ref();
    tracing::info!(fingerprint = %wg.fingerprint(), port = cfg.wireguard_port, default_mode = %cfg.encryption, datapath_pid = dp.map(|i| i.pid), "WireGuard ready");

    let health = health::Health::new(cfg.resync);
    if let Some(IpNet::V4(cidr)) = pod_cidrs.first() {
        let gateway = std::net::Ipv4Addr::from(u32::from(cidr.network()) + 1);
        *health
            .metrics
            .sources
            .ipam
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((
            cfg.state_dir.clone(),
            cni_config::NETWORK_NAME.to_string(),
            *cidr,
            gateway,
        ));
    }
    let health_cap =
        crate::listen::ConnLimit::new("health", health::Limits::HEALTH.max_connections);
    let metrics_cap =
        crate::listen::ConnLimit::new("metrics", health::Limits::METRICS.max_connections);
    let admission_cap =
        crate::listen::ConnLimit::new("admission", policy::ADMISSION_MAX_CONNECTIONS);
    let mut http_tasks = Vec::new();
    let mut listeners = vec![admission_cap.clone()];
    // `veilnet doctor --all-nodes` reads this node's report here, beside its metrics.
    let doctor_router = crate::doctor::endpoint::router(crate::doctor::Context::of_agent(&cfg));
    if cfg.health_addr == cfg.metrics_addr {
        let router = health::health_router(health.clone())
            .merge(health::metrics_router(health.clone()))
            .merge(doctor_router.clone());
        http_tasks.push(
            health::serve(
                cfg.health_addr,
                router,
                health::Limits::METRICS,
                metrics_cap.clone(),
            )
            .await?,
        );
        listeners.push(metrics_cap);
        tracing::info!(addr = %cfg.health_addr, "health, status and metrics endpoint");
    } else {
        http_tasks.push(
            health::serve(
                cfg.health_addr,
                health::health_router(health.clone()),
                health::Limits::HEALTH,
                health_cap.clone(),
            )
            .await?,
        );
        http_tasks.push(
            health::serve(
                cfg.metrics_addr,
                health::metrics_router(health.clone()).merge(doctor_router.clone()),
                health::Limits::METRICS,
                metrics_cap.clone(),
            )
            .await?,
        );
        listeners.extend([health_cap, metrics_cap]);
        tracing::info!(health = %cfg.health_addr, metrics = %cfg.metrics_addr, "health/status and metrics endpoints");
    }
    *health
        .metrics
        .sources
        .listeners
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = listeners;
    // ---- NetworkPolicy (issue 5): enforcer, CNI admission socket, flow log. Started before the
    // node state turns ready, so every ADD on this node waits for its pod's rules.
    let _policy = if args.no_policy {
        policy::disable(&cfg.run_dir).await?;
        None
    } else {
        let mut opts = policy::PolicyOptions::from_agent(&args, &cfg, underlay.ip, &pod_cidrs);
        opts.admission_cap = admission_cap;
        Some(policy::PolicyAgent::start(client.clone(), opts).await?)
    };
    if let Some(enforcer) = &_policy {
        *health
            .metrics
            .sources
            .policy_status
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(enforcer.status_feed());
        // The flow log, for `veilnet observe`: never to pods (see `flows`).
        if let Some(path) = enforcer.flow_log_path() {
            let flows_cap =
                crate::listen::ConnLimit::new("flows", health::Limits::FLOWS.max_connections);
            let shared = enforcer.shared();
            let cluster_cidr = IpNet::V4(cfg.cluster_cidr);
            let gate: health::SourceGate =
                Arc::new(move |source| flows::admits(&shared.pairs(), &cluster_cidr, source));
            http_tasks.push(
                health::serve_gated(
                    cfg.flows_addr,
                    flows::router(path),
                    health::Limits::FLOWS,
                    flows_cap.clone(),
                    Some(gate),
                )
                .await?,
            );
            health
                .metrics
                .sources
                .listeners
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(flows_cap);
            tracing::info!(addr = %cfg.flows_addr, "flows endpoint");
        }
    }
    // ---- end NetworkPolicy

    let me = snapshot::SelfInfo::new(&cfg.node_name, underlay, pod_cidrs, allocated);
    let events = events::EventSink::new(client.clone(), COMPONENT, &cfg.node_name);
    let resync = cfg.resync;
    let wire_run_dir = cfg.run_dir.clone();
    let publisher = ports::KubePublisher::new(client.clone(), events);
    let mut rec = reconcile::Reconciler::new(
        cfg,
        kernel,
        publisher,
        ports::NftWireTable {
            run_dir: wire_run_dir,
        },
        nodes,
        records,
        me,
        wg,
    );

    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    let mut ticker = tokio::time::interval(resync);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status_ticker = tokio::time::interval(Duration::from_secs(2));
    status_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures: u32 = 0;
    // When to retry a failed pass. Fixed when the pass fails, not re-armed each turn: the 2 s
    // status tick would otherwise win every race against a longer backoff and starve the retry.
    let mut retry_at = tokio::time::Instant::now();
    let mut pending = true;
    loop {
        health.beat();
        if pending {
            let started = std::time::Instant::now();
            match rec.reconcile().await {
                Err(e) => {
                    failures += 1;
                    // After a failure, retry soon (bounded backoff) even without a cluster change.
                    retry_at = tokio::time::Instant::now()
                        + Duration::from_millis(200 * u64::from(failures.min(25)));
                    health.metrics.reconcile_errors.inc();
                    tracing::error!(error = %e, failures, "reconcile failed; retrying");
                }
                // The pass was applied but left a part to retry (a key rotation the disk
                // refused): the same backoff, without counting or logging a failed pass.
                Ok(_) if rec.retry_wanted() => {
                    failures += 1;
                    retry_at = tokio::time::Instant::now()
                        + Duration::from_millis(200 * u64::from(failures.min(25)));
                }
                Ok(_) => failures = 0,
            }
            health
                .metrics
                .reconcile_duration
                .observe(started.elapsed().as_secs_f64());
            health.set_ready(rec.dataplane_ready);
        }
        rec.refresh_datapath().await;
        if let Some(st) = rec.write_status() {
            if let Some(enforcer) = &_policy {
                enforcer.set_pairs(policy::paths::PairPaths::of(&st));
            }
            *health
                .metrics
                .sources
                .status
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(st);
        }
        pending = true;
        tokio::select! {
            _ = notify.notified() => {
                // Coalesce the events of one change (a Node written, then its status) into one
                // pass. Longer bursts coalesce by themselves: what arrives during a pass wakes
                // exactly one more. Kept short: it is the floor of every change's latency.
                tokio::time::sleep(WATCH_COALESCE).await;
            }
            _ = ticker.tick() => {
                reconcile::release_deleted(client.clone(), &rec.cfg, &rec.me).await;
                // Give back what the last bursts freed (see crate::memory).
                crate::memory::trim();
            }
            _ = status_ticker.tick() => {
                // Refresh the counters in the status file and metrics; no reconcile needed.
                pending = false;
            }
            _ = tokio::time::sleep_until(retry_at), if failures > 0 => {}
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    tracing::info!("shutting down; the dataplane stays in place");
    nodes_task.abort();
    records_task.abort();
    for t in http_tasks {
        t.abort();
    }
    Ok(())
}
