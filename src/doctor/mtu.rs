//! The path MTU to each peer: does the route (and the device it leaves by) carry a pod's
//! full-sized packet once encapsulated, and, with probing on, does the underlay really pass a
//! packet that large with DF set (a switch port or tunnel with a smaller MTU drops it silently)?

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use super::{Check, Context};
use crate::agent::status::NodeStatus;
use crate::model::mtu::{Encapsulation, UnderlayFamily};

/// A small echo (the classic ping's 84 bytes): answers it but not the big one mean the path
/// drops big packets, not that the peer is gone.
pub const SMALL_PROBE: u32 = 84;
const TRIES: u32 = 3;
const TRY_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dev: String,
    pub device_mtu: u32,
    pub route_mtu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerFacts {
    pub node: String,
    pub ip: IpAddr,
    /// `wireguard` or `vxlan`.
    pub path: String,
    /// The outer packet a full-sized pod packet becomes on this path.
    pub wire_size: u32,
    pub route: Result<Route, String>,
    /// With probing: (the big probe's answer, the small probe's answer); `Err` when no probe
    /// could be sent (e.g. the local MTU refuses it).
    pub probe: Option<Result<(bool, bool), String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MtuFacts {
    pub pod_mtu: u32,
    pub peers: Vec<PeerFacts>,
    /// Peers without a known underlay address (older agent's status).
    pub unknown: Vec<String>,
}

/// The outer packet size of a `pod_mtu`-sized pod packet on `path` to `ip` (pure).
pub fn wire_size(pod_mtu: u32, path: &str, ip: IpAddr) -> u32 {
    let encapsulation = if path == "wireguard" {
        Encapsulation::WireGuard
    } else {
        Encapsulation::Vxlan
    };
    pod_mtu + encapsulation.overhead(UnderlayFamily::of(ip))
}

/// Peers probed at once: an unreachable peer costs [`TRIES`] × [`TRY_TIMEOUT`] twice, so one
/// after another a partitioned cluster would take minutes (and the agent's `/doctor` answers
/// within 12 s).
const PARALLEL_PROBES: usize = 32;

pub fn gather(ctx: &Context, status: Option<&NodeStatus>) -> MtuFacts {
    let Some(st) = status else {
        return MtuFacts::default();
    };
    let mut facts = MtuFacts {
        pod_mtu: st.pod_mtu,
        ..MtuFacts::default()
    };
    let mut targets = Vec::new();
    for p in &st.peers {
        if p.path != "wireguard" && p.path != "vxlan" {
            continue;
        }
        let ip = p
            .underlay_ip
            .as_deref()
            .and_then(|s| s.parse::<IpAddr>().ok())
            .or_else(|| {
                p.endpoint
                    .as_deref()
                    .and_then(|e| e.parse::<std::net::SocketAddr>().ok())
                    .map(|a| a.ip())
            });
        match ip {
            Some(ip) => targets.push((p.node.clone(), ip, p.path.clone())),
            None => facts.unknown.push(p.node.clone()),
        }
    }
    for chunk in targets.chunks(PARALLEL_PROBES) {
        let found: Vec<PeerFacts> = std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|(node, ip, path)| {
                    let (ip, size) = (*ip, wire_size(st.pod_mtu, path, *ip));
                    let probe_mtu = ctx.probe_mtu;
                    let netns = ctx.netns.clone();
                    let handle = scope.spawn(move || {
                        let work = move || {
                            let route = route_to(ip);
                            let probe = match ip {
                                IpAddr::V4(v4) if probe_mtu => {
                                    Some(echo(v4, size).and_then(|big| {
                                        echo(v4, SMALL_PROBE).map(|small| (big, small))
                                    }))
                                }
                                _ => None,
                            };
                            (route, probe)
                        };
                        match netns {
                            None => work(),
                            Some(ns) => crate::netns::run_in(&ns, work)
                                .unwrap_or_else(|e| (Err(e.to_string()), None)),
                        }
                    });
                    (node, ip, path, size, handle)
                })
                .collect();
            handles
                .into_iter()
                .map(|(node, ip, path, size, handle)| {
                    let (route, probe) = handle
                        .join()
                        .unwrap_or_else(|_| (Err("the probe panicked".to_string()), None));
                    PeerFacts {
                        node: node.clone(),
                        ip,
                        path: path.clone(),
                        wire_size: size,
                        route,
                        probe,
                    }
                })
                .collect()
        });
        facts.peers.extend(found);
    }
    facts
}

/// `ip route get` in the calling thread's namespace.
fn route_to(ip: IpAddr) -> Result<Route, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let kernel = crate::kernel::netlink::NetlinkKernel::connect().map_err(|e| e.to_string())?;
        let u = crate::kernel::mtu::underlay_for(&kernel, ip)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Route {
            dev: u.dev,
            device_mtu: u.device_mtu,
            route_mtu: u.route_mtu,
        })
    })
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request of `total` bytes on the wire (IP header included) with DF set, from the
/// calling thread's namespace: whether a reply came within [`TRIES`] × [`TRY_TIMEOUT`].
fn echo(dst: Ipv4Addr, total: u32) -> Result<bool, String> {
    use nix::sys::socket::{
        recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol,
        SockType, SockaddrIn,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Icmp,
    )
    .map_err(|e| format!("raw ICMP socket: {e}"))?;
    let pmtudisc: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: fd is an open socket we own; the option value is a c_int that outlives the call,
    // and its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&pmtudisc as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(format!(
            "IP_MTU_DISCOVER: {}",
            std::io::Error::last_os_error()
        ));
    }
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(0, 100_000),
    )
    .map_err(|e| e.to_string())?;
    let id = (std::process::id() as u16) ^ (total as u16);
    let payload = total.saturating_sub(28) as usize;
    let to = SockaddrIn::from(std::net::SocketAddrV4::new(dst, 0));
    for seq in 1..=TRIES as u16 {
        let mut packet = vec![0u8; 8 + payload];
        packet[0] = 8; // echo request
        packet[4..6].copy_from_slice(&id.to_be_bytes());
        packet[6..8].copy_from_slice(&seq.to_be_bytes());
        for (i, b) in packet[8..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let sum = checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
        if let Err(e) = sendto(fd.as_raw_fd(), &packet, &to, MsgFlags::empty()) {
            return Err(if e == nix::errno::Errno::EMSGSIZE {
                format!("this node refuses to send {total} bytes with DF (its own route MTU is smaller)")
            } else {
                format!("sending to {dst}: {e}")
            });
        }
        let deadline = Instant::now() + TRY_TIMEOUT;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            let Ok(n) = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) else {
                continue;
            };
            let reply = &buf[..n];
            if n < 20 {
                continue;
            }
            let ihl = usize::from(reply[0] & 0x0f) * 4;
            if n < ihl + 8 || reply[12..16] != dst.octets() {
                continue;
            }
            let icmp = &reply[ihl..];
            if icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() && icmp[6..8] == seq.to_be_bytes() {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

pub fn check(facts: &MtuFacts, status: Option<&NodeStatus>) -> Vec<Check> {
    if status.is_none() || (facts.peers.is_empty() && facts.unknown.is_empty()) {
        return Vec::new();
    }
    let mut checks = vec![check_routes(facts)];
    if facts.peers.iter().any(|p| p.probe.is_some()) {
        checks.push(check_probes(facts));
    }
    checks
}

fn check_routes(facts: &MtuFacts) -> Check {
    const NAME: &str = "mtu.route";
    let mut small = Vec::new();
    let mut unknown = Vec::new();
    let mut fine = Vec::new();
    for p in &facts.peers {
        match &p.route {
            Err(e) => unknown.push(format!("{} ({}): {e}", p.node, p.ip)),
            Ok(r) => {
                let mtu = crate::kernel::mtu::effective_mtu(r.route_mtu, r.device_mtu);
                if mtu < p.wire_size {
                    small.push(format!(
                        "{} ({}) via {} MTU {mtu} < {} (pod MTU {} + {} overhead)",
                        p.node, p.ip, r.dev, p.wire_size, facts.pod_mtu, p.path
                    ));
                } else {
                    fine.push(format!("{} via {} MTU {mtu}", p.node, r.dev));
                }
            }
        }
    }
    if !small.is_empty() {
        return Check::fail(
            NAME,
            format!("full-sized pod packets do not fit: {}", small.join("; ")),
            "lower the pod MTU (the agent's --mtu) or raise the underlay's MTU; pods must be recreated to pick up a new MTU",
        );
    }
    if !unknown.is_empty() || !facts.unknown.is_empty() {
        let mut all = unknown;
        all.extend(
            facts
                .unknown
                .iter()
                .map(|n| format!("{n}: no underlay address in the status")),
        );
        return Check::warn(
            NAME,
            format!("no route MTU for: {}", all.join("; ")),
            "check the underlay routes (ip route get PEER_IP) on this node",
        );
    }
    Check::ok(
        NAME,
        format!(
            "pod MTU {} fits every path once encapsulated: {}",
            facts.pod_mtu,
            fine.join(", ")
        ),
    )
}

fn check_probes(facts: &MtuFacts) -> Check {
    const NAME: &str = "mtu.probe";
    let (mut dropped, mut unreachable, mut failed, mut fine) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for p in &facts.peers {
        match &p.probe {
            None => {}
            Some(Err(e)) => failed.push(format!("{}: {e}", p.node)),
            Some(Ok((true, _))) => fine.push(format!("{} ({} bytes)", p.node, p.wire_size)),
            Some(Ok((false, true))) => dropped.push(format!(
                "{} ({}): {SMALL_PROBE} bytes answered, {} bytes with DF not",
                p.node, p.ip, p.wire_size
            )),
            Some(Ok((false, false))) => unreachable.push(format!("{} ({})", p.node, p.ip)),
        }
    }
    if !dropped.is_empty() || !failed.is_empty() {
        let mut all = dropped;
        all.extend(failed);
        return Check::fail(
            NAME,
            format!("the underlay drops full-sized packets: {}", all.join("; ")),
            "fix the underlay's MTU on the path (a switch port, tunnel or cloud link), or lower the pod MTU with the agent's --mtu",
        );
    }
    if !unreachable.is_empty() {
        return Check::warn(
            NAME,
            format!(
                "no ICMP echo answer at any size from {}",
                unreachable.join(", ")
            ),
            "the peer is down or filters ICMP: check it with ping from this node; run with --no-probe to skip",
        );
    }
    Check::ok(
        NAME,
        format!("DF echoes at full size answered: {}", fine.join(", ")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Verdict;

    fn peer(route_mtu: u32, probe: Option<Result<(bool, bool), String>>) -> PeerFacts {
        let ip: IpAddr = "172.30.0.12".parse().unwrap();
        PeerFacts {
            node: "node-2".into(),
            ip,
            path: "wireguard".into(),
            wire_size: wire_size(1440, "wireguard", ip),
            route: Ok(Route {
                dev: "eth0".into(),
                device_mtu: 1500,
                route_mtu: Some(route_mtu),
            }),
            probe,
        }
    }

    fn facts(peers: Vec<PeerFacts>) -> MtuFacts {
        MtuFacts {
            pod_mtu: 1440,
            peers,
            unknown: vec![],
        }
    }

    #[test]
    fn overheads_per_path() {
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(wire_size(1440, "wireguard", v4), 1500);
        assert_eq!(wire_size(1440, "vxlan", v4), 1490);
        assert_eq!(
            wire_size(1420, "wireguard", "fd00::1".parse().unwrap()),
            1500
        );
    }

    #[test]
    fn a_route_too_small_fails() {
        let f = facts(vec![peer(1500, None)]);
        assert_eq!(check_routes(&f).verdict, Verdict::Ok);
        let f = facts(vec![peer(1400, None)]);
        let c = check_routes(&f);
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(
            c.evidence
                .contains("node-2 (172.30.0.12) via eth0 MTU 1400 < 1500"),
            "{}",
            c.evidence
        );
        let mut p = peer(1500, None);
        p.route = Err("no route".into());
        assert_eq!(check_routes(&facts(vec![p])).verdict, Verdict::Warn);
    }

    #[test]
    fn probes_tell_dropped_big_packets_from_an_unreachable_peer() {
        let ok = facts(vec![peer(1500, Some(Ok((true, true))))]);
        assert_eq!(check_probes(&ok).verdict, Verdict::Ok);
        let c = check_probes(&facts(vec![peer(1500, Some(Ok((false, true))))]));
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.evidence.contains("node-2"), "{}", c.evidence);
        assert!(
            c.evidence
                .contains("84 bytes answered, 1500 bytes with DF not"),
            "{}",
            c.evidence
        );
        let c = check_probes(&facts(vec![peer(1500, Some(Ok((false, false))))]));
        assert_eq!(c.verdict, Verdict::Warn);
        let c = check_probes(&facts(vec![peer(1500, Some(Err("refuses".into())))]));
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(check(&ok, None).is_empty());
    }

    #[test]
    fn checksum_of_a_known_echo() {
        // type 8, code 0, id 1, seq 1, no payload: 0xf7fd.
        assert_eq!(checksum(&[8, 0, 0, 0, 0, 1, 0, 1]), 0xf7fd);
    }
}
