//! The ports veilnet listens on, in the node's namespace: who holds each.
//!
//! Sockets come from `/proc/thread-self/net/{udp,udp6,tcp,tcp6}` (read on a thread in the node's
//! namespace), their owners from the `socket:[INODE]` links under `/proc/*/fd`. veilnet's own
//! processes (comm `veilnet`: the agent and the datapath) are fine; so is a socket without an
//! owning process on the VXLAN port when a `veilvx*` device exists (the kernel's VXLAN socket).
//! Any other holder fails. A free port is OK with the agent down (it can start) and a FAIL with
//! the agent up (it should be listening).

use std::collections::BTreeMap;

use super::{Check, Context};
use crate::model::overlay::VXLAN_NAME_PREFIX;

/// The comm of veilnet's processes (the agent and the datapath are the same binary).
pub const VEILNET_COMM: &str = "veilnet";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Udp,
    Tcp,
}

/// One socket bound to a port we care about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    /// `udp`, `udp6`, `tcp6` …: the table it was listed in.
    pub table: String,
    pub local: String,
    pub inode: u64,
    /// Processes with a descriptor for it: (pid, comm).
    pub owners: Vec<(u32, String)>,
}

/// One port veilnet uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// `ports.wireguard` …
    pub check: &'static str,
    pub what: &'static str,
    pub proto: Proto,
    pub port: u16,
    /// The agent flag that changes it.
    pub flag: &'static str,
    pub sockets: Vec<Socket>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortsFacts {
    pub namespace: String,
    pub ports: Vec<Port>,
    /// `veilvx*` devices in the namespace.
    pub vxlan_devices: Vec<String>,
    /// Why the socket tables could not be read.
    pub error: Option<String>,
}

fn wanted(ctx: &Context) -> Vec<Port> {
    let port = |check, what, proto, port, flag| Port {
        check,
        what,
        proto,
        port,
        flag,
        sockets: Vec::new(),
    };
    vec![
        port(
            "ports.wireguard",
            "WireGuard (the datapath)",
            Proto::Udp,
            ctx.wireguard_port,
            "--wireguard-port",
        ),
        port(
            "ports.vxlan",
            "VXLAN (the kernel's veilvx device)",
            Proto::Udp,
            ctx.vxlan_port,
            "--vxlan-port",
        ),
        port(
            "ports.health",
            "the agent's health endpoint",
            Proto::Tcp,
            ctx.health_addr.port(),
            "--health-addr",
        ),
        port(
            "ports.metrics",
            "the agent's metrics endpoint",
            Proto::Tcp,
            ctx.metrics_addr.port(),
            "--metrics-addr",
        ),
    ]
}

/// A `/proc/net/{udp,tcp}[6]` row: (local address, local port, state, inode).
pub fn parse_row(line: &str) -> Option<(String, u16, u8, u64)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let (addr, port) = f.get(1)?.split_once(':')?;
    let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
    let inode = f.get(9)?.parse().ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some((
        decode_addr(addr).unwrap_or_else(|| addr.to_string()),
        port,
        state,
        inode,
    ))
}

/// The kernel writes addresses as 32-bit words in host byte order.
fn decode_addr(hex: &str) -> Option<String> {
    let words: Vec<u32> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match bytes.len() {
        4 => Some(std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string()),
        16 => {
            let b: [u8; 16] = bytes.try_into().ok()?;
            Some(format!("[{}]", std::net::Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

const TCP_LISTEN: u8 = 0x0A;

/// A socket table row: (table, local address, port, state, inode).
type Row = (String, String, u16, u8, u64);

/// Reads the socket tables and veilvx devices of the current thread's namespace.
fn read_tables() -> (Vec<Row>, Vec<String>) {
    let mut rows = Vec::new();
    for table in ["udp", "udp6", "tcp", "tcp6"] {
        let text =
            std::fs::read_to_string(format!("/proc/thread-self/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            if let Some((addr, port, state, inode)) = parse_row(line) {
                rows.push((table.to_string(), addr, port, state, inode));
            }
        }
    }
    let mut vx: Vec<String> = std::fs::read_dir("/proc/sys/net/ipv4/conf")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(VXLAN_NAME_PREFIX))
                .collect()
        })
        .unwrap_or_default();
    vx.sort();
    (rows, vx)
}

/// Socket inode → the processes holding it, from `/proc/*/fd`.
fn socket_owners() -> BTreeMap<u64, Vec<(u32, String)>> {
    let mut owners: BTreeMap<u64, Vec<(u32, String)>> = BTreeMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return owners;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let mut comm = None;
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let link = link.to_string_lossy();
            let Some(inode) = link
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let comm = comm
                .get_or_insert_with(|| {
                    std::fs::read_to_string(p.path().join("comm"))
                        .map(|c| c.trim().to_string())
                        .unwrap_or_default()
                })
                .clone();
            let list = owners.entry(inode).or_default();
            if !list.iter().any(|(p, _)| *p == pid) {
                list.push((pid, comm));
            }
        }
    }
    owners
}

pub fn gather(ctx: &Context) -> PortsFacts {
    let mut ports = wanted(ctx);
    let (namespace, tables) = match &ctx.netns {
        Some(ns) => (
            format!("netns {ns}"),
            crate::netns::run_in(ns, read_tables).map_err(|e| e.to_string()),
        ),
        None => ("this namespace".to_string(), Ok(read_tables())),
    };
    let (rows, vxlan_devices, error) = match tables {
        Ok((rows, vx)) => (rows, vx, None),
        Err(e) => (Vec::new(), Vec::new(), Some(e)),
    };
    let owners = socket_owners();
    for p in &mut ports {
        for (table, addr, port, state, inode) in &rows {
            let proto = if table.starts_with("udp") {
                Proto::Udp
            } else {
                Proto::Tcp
            };
            if proto != p.proto || *port != p.port || (proto == Proto::Tcp && *state != TCP_LISTEN)
            {
                continue;
            }
            p.sockets.push(Socket {
                table: table.clone(),
                local: format!("{addr}:{port}"),
                inode: *inode,
                owners: owners.get(inode).cloned().unwrap_or_default(),
            });
        }
    }
    PortsFacts {
        namespace,
        ports,
        vxlan_devices,
        error,
    }
}

/// `agent_up`: the agent's status is fresh (`agent.up` OK).
/// `datapath_port`: the UDP port the datapath says its device listens on (it answered its
/// control socket). A socket without a visible owner on that port is the datapath's when doctor
/// runs in another PID namespace than the datapath (the agent's container serving `/doctor`,
/// `kubectl exec` into it): the socket tables are the node's, the processes only the container's.
pub fn check(f: &PortsFacts, agent_up: bool, datapath_port: Option<u16>) -> Vec<Check> {
    f.ports
        .iter()
        .map(|p| check_port(f, p, agent_up, datapath_port))
        .collect()
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Udp => "UDP",
        Proto::Tcp => "TCP",
    }
}

fn check_port(f: &PortsFacts, p: &Port, agent_up: bool, datapath_port: Option<u16>) -> Check {
    let label = format!("{}/{}", p.port, proto_name(p.proto));
    if let Some(e) = &f.error {
        return Check::fail(
            p.check,
            format!("cannot read the socket tables of {}: {e}", f.namespace),
            "run doctor as root on the node",
        );
    }
    let mut ours = Vec::new();
    let mut foreign = Vec::new();
    for s in &p.sockets {
        if s.owners.is_empty() {
            if p.check == "ports.vxlan" && !f.vxlan_devices.is_empty() {
                ours.push(format!(
                    "{} {} (kernel, {})",
                    s.table,
                    s.local,
                    f.vxlan_devices.join(",")
                ));
            } else if p.check == "ports.wireguard" && datapath_port == Some(p.port) {
                ours.push(format!(
                    "{} {} (the datapath, which listens there; its process is outside this PID namespace)",
                    s.table, s.local
                ));
            } else {
                foreign.push(format!(
                    "{} {} held by the kernel or a process outside this PID namespace (inode {}; another tunnel device?)",
                    s.table, s.local, s.inode
                ));
            }
            continue;
        }
        for (pid, comm) in &s.owners {
            if comm == VEILNET_COMM {
                ours.push(format!("{} {} (pid {pid} {comm})", s.table, s.local));
            } else {
                foreign.push(format!(
                    "{} {} held by pid {pid} ({comm})",
                    s.table, s.local
                ));
            }
        }
    }
    if !foreign.is_empty() {
        let pids: Vec<String> = p
            .sockets
            .iter()
            .flat_map(|s| &s.owners)
            .filter(|(_, c)| c != VEILNET_COMM)
            .map(|(pid, _)| pid.to_string())
            .collect();
        let stop = if pids.is_empty() {
            "remove the other tunnel device holding it (ip -d link show type vxlan)".to_string()
        } else {
            format!("stop it (kill {})", pids.join(" "))
        };
        return Check::fail(
            p.check,
            format!(
                "{label} for {}: {} ({})",
                p.what,
                foreign.join("; "),
                f.namespace
            ),
            format!(
                "{stop}, or give veilnet another port with the agent flag {}",
                p.flag
            ),
        );
    }
    if !ours.is_empty() {
        return Check::ok(
            p.check,
            format!("{label} for {}: {}", p.what, ours.join("; ")),
        );
    }
    if agent_up {
        Check::fail(
            p.check,
            format!(
                "{label} for {}: nothing listens, though the agent is up ({})",
                p.what, f.namespace
            ),
            "check the agent's (and the datapath's) log: it binds this port at start",
        )
    } else {
        Check::ok(
            p.check,
            format!("{label} for {}: free, the agent can start", p.what),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::Verdict;
    use super::*;

    fn port(check: &'static str, proto: Proto, n: u16, sockets: Vec<Socket>) -> Port {
        Port {
            check,
            what: "x",
            proto,
            port: n,
            flag: "--flag",
            sockets,
        }
    }
    fn sock(table: &str, local: &str, owners: &[(u32, &str)]) -> Socket {
        Socket {
            table: table.into(),
            local: local.into(),
            inode: 4242,
            owners: owners.iter().map(|(p, c)| (*p, c.to_string())).collect(),
        }
    }
    fn facts(ports: Vec<Port>, vx: &[&str]) -> PortsFacts {
        PortsFacts {
            namespace: "netns lab.n1".into(),
            ports,
            vxlan_devices: vx.iter().map(|s| s.to_string()).collect(),
            error: None,
        }
    }

    #[test]
    fn proc_net_rows_parse() {
        let v4 = "  12: 00000000:CA6C 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 31337 2 0000000000000000 0";
        assert_eq!(parse_row(v4), Some(("0.0.0.0".into(), 51820, 7, 31337)));
        let lo = "   0: 0100007F:26A3 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0";
        let (addr, port, state, inode) = parse_row(lo).unwrap();
        assert_eq!(
            (addr.as_str(), port, state, inode),
            ("127.0.0.1", 9891, 0x0A, 777)
        );
        let v6 = "   1: 00000000000000000000000000000000:CB20 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 99 2 0000000000000000 0";
        assert_eq!(parse_row(v6).unwrap().0, "[::]");
        assert_eq!(parse_row("  sl  local_address rem_address"), None);
    }

    #[test]
    fn veilnet_and_the_kernel_vxlan_socket_are_ok() {
        let f = facts(
            vec![
                port(
                    "ports.wireguard",
                    Proto::Udp,
                    51820,
                    vec![sock("udp", "0.0.0.0:51820", &[(100, "veilnet")])],
                ),
                port(
                    "ports.vxlan",
                    Proto::Udp,
                    8472,
                    vec![sock("udp", "0.0.0.0:8472", &[])],
                ),
                port(
                    "ports.health",
                    Proto::Tcp,
                    9891,
                    vec![sock("tcp", "127.0.0.1:9891", &[(101, "veilnet")])],
                ),
            ],
            &["veilvx1"],
        );
        let c = check(&f, true, None);
        assert!(c.iter().all(|c| c.verdict == Verdict::Ok), "{c:?}");
        assert!(
            c[0].evidence.contains("pid 100 veilnet"),
            "{}",
            c[0].evidence
        );
        assert!(
            c[1].evidence.contains("kernel, veilvx1"),
            "{}",
            c[1].evidence
        );
    }

    #[test]
    fn another_process_fails_with_its_pid_and_comm() {
        let f = facts(
            vec![port(
                "ports.wireguard",
                Proto::Udp,
                51820,
                vec![sock("udp", "0.0.0.0:51820", &[(4711, "python3")])],
            )],
            &[],
        );
        for up in [true, false] {
            let c = &check(&f, up, None)[0];
            assert_eq!(c.verdict, Verdict::Fail);
            assert!(
                c.evidence.contains("held by pid 4711 (python3)"),
                "{}",
                c.evidence
            );
            let fix = c.fix.as_deref().unwrap();
            assert!(fix.contains("kill 4711") && fix.contains("--flag"), "{fix}");
        }
    }

    #[test]
    fn a_kernel_socket_without_our_vxlan_device_fails() {
        let f = facts(
            vec![port(
                "ports.vxlan",
                Proto::Udp,
                8472,
                vec![sock("udp", "0.0.0.0:8472", &[])],
            )],
            &[],
        );
        let c = &check(&f, false, None)[0];
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(
            c.evidence
                .contains("held by the kernel or a process outside"),
            "{}",
            c.evidence
        );
    }

    #[test]
    fn an_ownerless_wireguard_socket_is_the_datapath_only_where_it_listens() {
        let f = facts(
            vec![port(
                "ports.wireguard",
                Proto::Udp,
                51820,
                vec![sock("udp", "0.0.0.0:51820", &[])],
            )],
            &[],
        );
        let c = &check(&f, true, Some(51820))[0];
        assert_eq!(c.verdict, Verdict::Ok, "{c:?}");
        assert!(c.evidence.contains("the datapath"), "{}", c.evidence);
        assert_eq!(check(&f, true, Some(51821))[0].verdict, Verdict::Fail);
        assert_eq!(check(&f, true, None)[0].verdict, Verdict::Fail);
    }

    #[test]
    fn a_free_port_is_ok_only_with_the_agent_down() {
        let f = facts(vec![port("ports.health", Proto::Tcp, 9891, vec![])], &[]);
        assert_eq!(check(&f, false, None)[0].verdict, Verdict::Ok);
        assert!(check(&f, false, None)[0]
            .evidence
            .contains("free, the agent can start"));
        assert_eq!(check(&f, true, None)[0].verdict, Verdict::Fail);
    }
}
