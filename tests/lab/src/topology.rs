//! Creates and removes a lab's namespaces, underlay bridge and veths.
//!
//! Every link is created directly inside the lab's namespaces (`ip -n NS link add … peer … netns
//! OTHER`), so nothing ever appears in the root namespace, not even for an instant. Every step is
//! idempotent: `up` after a half-finished `up` completes it; `down` after a crash removes what is left.

use std::time::{Duration, Instant};

use super::layout::{LabLayout, UNDERLAY_BRIDGE, UNDERLAY_IFNAME};
use veilnet::netns::{self, NetnsError};

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("failed to remove {path}: {source}")]
    RemoveDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("processes still inside {netns} after SIGKILL: {pids:?}")]
    Unkillable { netns: String, pids: Vec<i32> },
}

pub type Result<T> = std::result::Result<T, TopologyError>;

fn ip(ns: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    netns::run("ip", &full)?;
    Ok(())
}

fn link_exists(ns: &str, name: &str) -> bool {
    netns::run("ip", &["-n", ns, "link", "show", "dev", name]).is_ok()
}

/// Creates the underlay switch, the control plane and every node's namespace with its link onto the
/// underlay. Safe to run again on a lab that is (partly) up.
pub fn up(lab: &LabLayout) -> Result<()> {
    let ul = lab.underlay_netns();
    let mtu = lab.spec.underlay_mtu.to_string();
    netns::add(&ul)?;
    if !link_exists(&ul, UNDERLAY_BRIDGE) {
        ip(&ul, &["link", "add", UNDERLAY_BRIDGE, "type", "bridge"])?;
    }
    ip(&ul, &["link", "set", UNDERLAY_BRIDGE, "mtu", &mtu, "up"])?;

    let prefix = lab.spec.underlay_cidr.prefix_len();
    attach(
        lab,
        &lab.control_plane_netns(),
        "cp",
        lab.control_plane_ip(),
        prefix,
    )?;
    for node in lab.nodes() {
        attach(lab, &node.netns, &node.underlay_port, node.ip, prefix)?;
    }
    if lab.spec.external_host {
        // On the underlay subnet, so every node reaches it directly; no route to the pod CIDRs,
        // as a host outside the cluster has none.
        attach(lab, &lab.external_netns(), "ext", lab.external_ip(), prefix)?;
        ip(&lab.external_netns(), &["link", "set", "lo", "up"])?;
    }
    Ok(())
}

/// One host on the underlay: its namespace, a veth with `eth0` inside and `port` on the bridge.
fn attach(
    lab: &LabLayout,
    ns: &str,
    port: &str,
    addr: std::net::Ipv4Addr,
    prefix: u8,
) -> Result<()> {
    let ul = lab.underlay_netns();
    let mtu = lab.spec.underlay_mtu.to_string();
    netns::add(ns)?;
    if !link_exists(ns, UNDERLAY_IFNAME) {
        if link_exists(&ul, port) {
            // Half of a pair from an interrupted run: start over.
            ip(&ul, &["link", "del", port])?;
        }
        ip(
            &ul,
            &[
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                UNDERLAY_IFNAME,
                "netns",
                ns,
            ],
        )?;
    }
    ip(
        &ul,
        &[
            "link",
            "set",
            port,
            "mtu",
            &mtu,
            "master",
            UNDERLAY_BRIDGE,
            "up",
        ],
    )?;
    ip(ns, &["link", "set", UNDERLAY_IFNAME, "mtu", &mtu, "up"])?;
    ip(
        ns,
        &[
            "addr",
            "replace",
            &format!("{addr}/{prefix}"),
            "dev",
            UNDERLAY_IFNAME,
        ],
    )?;
    Ok(())
}

/// Every namespace that belongs to the lab named `name`, found by prefix so that leftovers of a
/// crashed or half-finished `up` are found too.
pub fn lab_namespaces(name: &str) -> Vec<String> {
    let prefix = format!("{name}.");
    netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// Kills every process inside the given namespaces: SIGTERM, a grace period, then SIGKILL.
/// Signals go through pidfds after re-checking the namespace (see [`netns::signal_members`]), so a
/// recycled PID that now belongs to another lab's process is never hit.
pub fn kill_all_in(namespaces: &[String], grace: Duration) -> Result<()> {
    let signal_all = |sig: i32| -> Result<usize> {
        let mut n = 0;
        for ns in namespaces {
            n += netns::signal_members(ns, sig)?;
        }
        Ok(n)
    };
    let alive = || -> Result<Vec<(String, i32)>> {
        let mut all = Vec::new();
        for ns in namespaces {
            for pid in netns::pids(ns)? {
                all.push((ns.clone(), pid));
            }
        }
        Ok(all)
    };
    if signal_all(libc::SIGTERM)? == 0 {
        return Ok(());
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if alive()?.is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    signal_all(libc::SIGKILL)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = alive()?;
        let Some((ns, _)) = left.first() else {
            return Ok(());
        };
        if Instant::now() >= deadline {
            return Err(TopologyError::Unkillable {
                netns: ns.clone(),
                pids: left.iter().map(|(_, p)| *p).collect(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes everything of the lab named `name`: processes, namespaces (and so every veth, bridge and
/// address in them) and its directory. Idempotent; works without `lab.json`.
pub fn down(name: &str, root: &std::path::Path) -> Result<()> {
    let namespaces = lab_namespaces(name);
    kill_all_in(&namespaces, Duration::from_secs(3))?;
    // Pods first, then nodes, control plane and the underlay last: nothing depends on order for
    // correctness, but it keeps `ip netns` output sensible while it runs.
    let mut ordered = namespaces;
    ordered.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for ns in &ordered {
        netns::delete(ns)?;
    }
    if root.exists() {
        std::fs::remove_dir_all(root).map_err(|source| TopologyError::RemoveDir {
            path: root.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}
