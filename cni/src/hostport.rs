//! hostPort: the `portMappings` capability, as DNAT in veilnet's own nftables table.
//!
//! What it does (like the reference `portmap` plugin): a connection to one of the node's
//! addresses (or the mapping's `hostIP`) on `hostPort` is DNATed to `podIP:containerPort`, from
//! the underlay and from other pods (`prerouting`) and from the node itself (`output`). A pod
//! reaching its *own* hostPort through the node's address (hairpin) is masqueraded to the bridge
//! gateway, or its reply would go straight back to itself with the wrong source; that is the only
//! SNAT here, it is not egress masquerade.
//!
//! Why a table of our own (`table ip veilnet_hostport`) rather than the reference plugin's
//! iptables chains or the agent's tables: the plugin owns it alone and loads it whole, so each
//! change is one `nft -f` transaction that replaces the table (declare, delete, declare with
//! content): never a half-updated set of DNAT rules, nothing to diff, and no other component's
//! rules are touched (kube-proxy's, the agent's `inet veilnet` / `inet veilnet_wire`). With no
//! mapping left the table is deleted, so a node without hostPorts carries no NAT hook at all.
//!
//! The mappings are node state shared by concurrent CNI invocations: one JSON file,
//! `<stateDir>/hostport/mappings.json`, read and rewritten (atomically, [`crate::fsutil`]) under
//! an exclusive `flock` on `<stateDir>/hostport/lock`, as the IPAM store does. The table is
//! reloaded under the same lock, so the kernel always holds exactly what the file says. Entries
//! are keyed by network + container ID + interface.
//!
//! Rendering ([`plan`]) and conflict detection ([`find_conflict`]) are pure and unit-tested.
//!
//! What the DNAT means for NetworkPolicy: only the destination is rewritten, so a DNATed packet
//! reaches the pod (and the agent's forward chain) with the client's own source address: an
//! ingress policy on the pod judges the real client (an external host's or a node's address, an
//! `ipBlock` matches it), not the node. Hairpin traffic is judged as coming from the pod itself.
//! `127.0.0.1:hostPort` is not mapped (that would need `route_localnet` and SNAT of loopback).

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::Flock;
use serde::{Deserialize, Serialize};

use crate::env::Attachment;
use crate::fsutil::{write_atomic, WriteOptions};

/// The table (family `ip`: veilnet pods have IPv4 addresses only).
pub const TABLE: &str = "veilnet_hostport";
/// Every rule carries a comment starting with this, naming its attachment and mapping.
pub const COMMENT_PREFIX: &str = "veilnet-hostport";

const DIR: &str = "hostport";
const LOCK_FILE: &str = "lock";
const MAPPINGS_FILE: &str = "mappings.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One validated mapping (see `crate::capabilities` for the parsing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
    /// `None`: every address of the node (`hostIP` empty or `0.0.0.0`).
    pub host_ip: Option<Ipv4Addr>,
}

impl PortMapping {
    /// Whether both cannot be held at once: same protocol and port, and an address in common
    /// (an unspecified `hostIP` overlaps every address).
    pub fn overlaps(&self, other: &PortMapping) -> bool {
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && match (self.host_ip, other.host_ip) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    /// `8080/tcp` or `192.0.2.1:8080/tcp`.
    pub fn host_side(&self) -> String {
        match self.host_ip {
            Some(ip) => format!("{ip}:{}/{}", self.host_port, self.protocol.as_str()),
            None => format!("{}/{}", self.host_port, self.protocol.as_str()),
        }
    }
}

/// The mappings of one attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    /// `namespace/name` when the runtime said (for messages only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub pod_ip: Ipv4Addr,
    pub mappings: Vec<PortMapping>,
}

impl Entry {
    fn is(&self, network: &str, attachment: &Attachment) -> bool {
        self.network == network
            && self.container_id == attachment.container_id
            && self.ifname == attachment.ifname
    }

    /// Who holds a mapping, for the conflict message.
    pub fn holder(&self) -> String {
        match &self.pod {
            Some(pod) => format!(
                "pod {pod} (container {}, {})",
                self.container_id, self.ifname
            ),
            None => format!("container {} ({})", self.container_id, self.ifname),
        }
    }
}

/// A requested mapping another attachment holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub requested: PortMapping,
    pub held: PortMapping,
    pub holder: String,
}

/// The first requested mapping that overlaps one held by another attachment (pure). The
/// attachment's own entry (a repeated ADD) is not a conflict: it is replaced.
pub fn find_conflict(
    entries: &[Entry],
    network: &str,
    attachment: &Attachment,
    requested: &[PortMapping],
) -> Option<Conflict> {
    requested.iter().find_map(|want| {
        entries
            .iter()
            .filter(|e| !e.is(network, attachment))
            .find_map(|e| {
                e.mappings
                    .iter()
                    .find(|held| held.overlaps(want))
                    .map(|held| Conflict {
                        requested: *want,
                        held: *held,
                        holder: e.holder(),
                    })
            })
    })
}

/// The comment of a mapping's rule: the attachment and the mapping, so CHECK can find it.
pub fn rule_comment(container_id: &str, ifname: &str, m: &PortMapping) -> String {
    // nft comments hold at most 128 bytes; container IDs are 64 hex digits.
    let id: String = container_id.chars().take(64).collect();
    format!("{COMMENT_PREFIX} {id} {ifname} {}", m.host_side())
}

/// The script that makes the kernel's table exactly `entries` (pure): the table replaced whole in
/// one transaction, or deleted when no mapping is left. Entries are rendered in a stable order.
pub fn plan(entries: &[Entry]) -> String {
    // `table` first, so `delete` works whether or not the table exists.
    let mut s = format!("table ip {TABLE}\ndelete table ip {TABLE}\n");
    let mut sorted: Vec<&Entry> = entries.iter().filter(|e| !e.mappings.is_empty()).collect();
    if sorted.is_empty() {
        return s;
    }
    sorted.sort_by(|a, b| {
        (&a.network, &a.container_id, &a.ifname).cmp(&(&b.network, &b.container_id, &b.ifname))
    });
    let hairpin: BTreeSet<Ipv4Addr> = sorted.iter().map(|e| e.pod_ip).collect();
    s.push_str(&format!("table ip {TABLE} {{\n"));
    // Hairpin: packets whose source is the pod they were DNATed to (`x . x`). A set rather than a
    // ct mark: no mark bits to share with kube-proxy or anyone else.
    let elements: Vec<String> = hairpin.iter().map(|ip| format!("{ip} . {ip}")).collect();
    s.push_str(&format!(
        "\tset hairpin {{\n\t\ttype ipv4_addr . ipv4_addr\n\t\telements = {{ {} }}\n\t}}\n",
        elements.join(", ")
    ));
    // Only traffic to the node's own addresses (not loopback) is looked at.
    s.push_str(
        "\tchain prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tfib daddr type local ip daddr != 127.0.0.0/8 jump hostports\n\t}\n\
         \tchain output {\n\t\ttype nat hook output priority -100; policy accept;\n\
         \t\tfib daddr type local ip daddr != 127.0.0.0/8 jump hostports\n\t}\n\
         \tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tct status dnat ip saddr . ip daddr @hairpin masquerade\n\t}\n\
         \tchain hostports {\n",
    );
    for e in sorted {
        let mut mappings = e.mappings.clone();
        mappings.sort();
        for m in &mappings {
            let daddr = m
                .host_ip
                .map(|ip| format!("ip daddr {ip} "))
                .unwrap_or_default();
            s.push_str(&format!(
                "\t\t{daddr}{proto} dport {hp} dnat to {pod}:{cp} comment \"{comment}\"\n",
                proto = m.protocol.as_str(),
                hp = m.host_port,
                pod = e.pod_ip,
                cp = m.container_port,
                comment = rule_comment(&e.container_id, &e.ifname, m),
            ));
        }
    }
    s.push_str("\t}\n}\n");
    s
}

#[derive(Debug, thiserror::Error)]
pub enum HostPortError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("hostport mappings {path} cannot be parsed: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("hostPort {} is already in use by {}{}", .0.requested.host_side(), .0.holder, if .0.held != .0.requested { format!(" (which holds {})", .0.held.host_side()) } else { String::new() })]
    Taken(Box<Conflict>),
    #[error("hostPort needs nftables' nft, which is not installed (looked in /usr/sbin, /sbin, /usr/bin, /bin and PATH)")]
    NftMissing,
    #[error("nft -f (table ip {TABLE}): {detail}")]
    Nft { detail: String },
}

type Result<T> = std::result::Result<T, HostPortError>;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> HostPortError {
    let path = path.to_path_buf();
    move |source| HostPortError::Io { op, path, source }
}

fn nft_binary() -> Result<PathBuf> {
    crate::fsutil::find_program("nft").ok_or(HostPortError::NftMissing)
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new(nft_binary()?)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| HostPortError::Nft {
            detail: e.to_string(),
        })?;
    if let (Some(script), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(script.as_bytes())
            .map_err(|e| HostPortError::Nft {
                detail: format!("writing the script: {e}"),
            })?;
    }
    let out = child.wait_with_output().map_err(|e| HostPortError::Nft {
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(HostPortError::Nft {
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Loads `script` (from [`plan`]) in the calling thread's network namespace, in one transaction.
pub fn apply(script: &str) -> Result<()> {
    nft(&["-f", "-"], Some(script)).map(drop)
}

/// The table as the kernel lists it, or `None` when there is none.
pub fn list_table() -> Result<Option<String>> {
    match nft(&["list", "table", "ip", TABLE], None) {
        Ok(text) => Ok(Some(text)),
        Err(HostPortError::Nft { detail })
            if detail.contains("No such file") || detail.contains("does not exist") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Why the kernel's table lacks a mapping of `entry`, if it does (for CHECK).
pub fn missing_in(listing: Option<&str>, entry: &Entry) -> Option<String> {
    entry.mappings.iter().find_map(|m| {
        let comment = rule_comment(&entry.container_id, &entry.ifname, m);
        let dnat = format!("dnat to {}:{}", entry.pod_ip, m.container_port);
        let present = listing.is_some_and(|text| {
            text.lines()
                .any(|l| l.contains(&format!("\"{comment}\"")) && l.contains(&dnat))
        });
        (!present).then(|| {
            format!(
                "hostPort {} → {}:{} is not in table ip {TABLE}",
                m.host_side(),
                entry.pod_ip,
                m.container_port
            )
        })
    })
}

/// The node's mappings on disk.
#[derive(Debug, Clone)]
pub struct HostPortStore {
    dir: PathBuf,
}

struct Locked<'a> {
    file: PathBuf,
    _lock: Flock<File>,
    _dir: &'a Path,
}

impl Locked<'_> {
    fn read(&self) -> Result<Vec<Entry>> {
        match fs::read(&self.file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| HostPortError::Corrupt {
                path: self.file.clone(),
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_err("read", &self.file)(e)),
        }
    }

    fn write(&self, entries: &[Entry]) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(entries).expect("entries serialize");
        write_atomic(&self.file, &bytes, WriteOptions::DURABLE).map_err(io_err("write", &self.file))
    }

    /// Makes `new` the state: the table first (so a refused script changes nothing), then the
    /// file; if the file cannot be written, the table goes back to `old`.
    fn commit(&self, old: &[Entry], new: &[Entry]) -> Result<()> {
        apply(&plan(new))?;
        if let Err(e) = self.write(new) {
            if let Err(back) = apply(&plan(old)) {
                eprintln!("veilnet-cni: hostport: cannot restore the table: {back}");
            }
            return Err(e);
        }
        Ok(())
    }
}

impl HostPortStore {
    pub fn new(state_dir: &Path) -> HostPortStore {
        HostPortStore {
            dir: state_dir.join(DIR),
        }
    }

    fn lock(&self) -> Result<Locked<'_>> {
        let lock = crate::fsutil::lock_exclusive(&self.dir, LOCK_FILE)
            .map_err(|(op, path, source)| HostPortError::Io { op, path, source })?;
        Ok(Locked {
            file: self.dir.join(MAPPINGS_FILE),
            _lock: lock,
            _dir: &self.dir,
        })
    }

    /// Records `entry`'s mappings (replacing the attachment's earlier ones) and reloads the
    /// table, unless one of them is held by another attachment.
    pub fn add(&self, entry: Entry) -> Result<()> {
        let locked = self.lock()?;
        let old = locked.read()?;
        let attachment = Attachment {
            container_id: entry.container_id.clone(),
            ifname: entry.ifname.clone(),
        };
        if let Some(c) = find_conflict(&old, &entry.network, &attachment, &entry.mappings) {
            return Err(HostPortError::Taken(Box::new(c)));
        }
        let mut new: Vec<Entry> = old
            .iter()
            .filter(|e| !e.is(&entry.network, &attachment))
            .cloned()
            .collect();
        new.push(entry);
        locked.commit(&old, &new)
    }

    /// Drops the attachment's mappings and reloads the table; nothing held is fine (and touches
    /// no kernel state).
    pub fn remove(&self, network: &str, attachment: &Attachment) -> Result<bool> {
        let locked = self.lock()?;
        let old = locked.read()?;
        let new: Vec<Entry> = old
            .iter()
            .filter(|e| !e.is(network, attachment))
            .cloned()
            .collect();
        if new.len() == old.len() {
            return Ok(false);
        }
        locked.commit(&old, &new).map(|()| true)
    }

    /// Drops the mappings of `network`'s attachments not in `valid`; returns how many entries.
    pub fn gc(
        &self,
        network: &str,
        valid: &std::collections::HashSet<Attachment>,
    ) -> Result<usize> {
        let locked = self.lock()?;
        let old = locked.read()?;
        let new: Vec<Entry> = old
            .iter()
            .filter(|e| {
                e.network != network
                    || valid.contains(&Attachment {
                        container_id: e.container_id.clone(),
                        ifname: e.ifname.clone(),
                    })
            })
            .cloned()
            .collect();
        let dropped = old.len() - new.len();
        if dropped > 0 {
            locked.commit(&old, &new)?;
        }
        Ok(dropped)
    }

    /// The attachment's entry, if any.
    pub fn lookup(&self, network: &str, attachment: &Attachment) -> Result<Option<Entry>> {
        let locked = self.lock()?;
        Ok(locked
            .read()?
            .into_iter()
            .find(|e| e.is(network, attachment)))
    }

    /// Every entry (tests, diagnostics).
    pub fn entries(&self) -> Result<Vec<Entry>> {
        self.lock()?.read()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(hp: u16, cp: u16, protocol: Protocol, host_ip: Option<&str>) -> PortMapping {
        PortMapping {
            host_port: hp,
            container_port: cp,
            protocol,
            host_ip: host_ip.map(|s| s.parse().unwrap()),
        }
    }

    fn entry(id: &str, ip: &str, mappings: Vec<PortMapping>) -> Entry {
        Entry {
            network: "veilnet".into(),
            container_id: id.into(),
            ifname: "eth0".into(),
            pod: Some(format!("default/{id}")),
            pod_ip: ip.parse().unwrap(),
            mappings,
        }
    }

    fn att(id: &str) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn overlaps() {
        use Protocol::*;
        let any = m(8080, 80, Tcp, None);
        assert!(any.overlaps(&m(8080, 81, Tcp, None)));
        assert!(any.overlaps(&m(8080, 80, Tcp, Some("192.0.2.1"))));
        assert!(m(8080, 80, Tcp, Some("192.0.2.1")).overlaps(&any));
        assert!(!m(8080, 80, Tcp, Some("192.0.2.1")).overlaps(&m(
            8080,
            80,
            Tcp,
            Some("192.0.2.2")
        )));
        assert!(!any.overlaps(&m(8080, 80, Udp, None)));
        assert!(!any.overlaps(&m(8081, 80, Tcp, None)));
    }

    #[test]
    fn conflicts() {
        use Protocol::*;
        let held = vec![
            entry("a", "10.244.1.5", vec![m(8080, 80, Tcp, None)]),
            entry("b", "10.244.1.6", vec![m(53, 53, Udp, Some("192.0.2.1"))]),
        ];
        let c = find_conflict(&held, "veilnet", &att("c"), &[m(8080, 8080, Tcp, None)]).unwrap();
        assert_eq!(c.holder, "pod default/a (container a, eth0)");
        // An unspecified hostIP overlaps a specific one, and the reverse.
        let c = find_conflict(&held, "veilnet", &att("c"), &[m(53, 5353, Udp, None)]).unwrap();
        assert_eq!(c.held, m(53, 53, Udp, Some("192.0.2.1")));
        let c = find_conflict(
            &held,
            "veilnet",
            &att("c"),
            &[m(8080, 80, Tcp, Some("192.0.2.9"))],
        );
        assert!(c.is_some());
        let e = HostPortError::Taken(Box::new(c.unwrap())).to_string();
        assert_eq!(
            e,
            "hostPort 192.0.2.9:8080/tcp is already in use by pod default/a (container a, eth0) (which holds 8080/tcp)"
        );
        // Free: other protocol, other port, other address.
        assert!(find_conflict(
            &held,
            "veilnet",
            &att("c"),
            &[
                m(8080, 80, Udp, None),
                m(8081, 80, Tcp, None),
                m(53, 53, Udp, Some("192.0.2.2"))
            ]
        )
        .is_none());
        // A repeated ADD of the holder is no conflict; the same attachment on another network is.
        assert!(find_conflict(&held, "veilnet", &att("a"), &[m(8080, 80, Tcp, None)]).is_none());
        assert!(find_conflict(&held, "other", &att("a"), &[m(8080, 80, Tcp, None)]).is_some());
    }

    #[test]
    fn plan_golden() {
        use Protocol::*;
        let entries = vec![
            entry(
                "b",
                "10.244.1.6",
                vec![m(53, 5353, Udp, None), m(8443, 443, Tcp, Some("192.0.2.1"))],
            ),
            entry("a", "10.244.1.5", vec![m(8080, 80, Tcp, None)]),
            entry("empty", "10.244.1.7", vec![]),
        ];
        let expected = "\
table ip veilnet_hostport
delete table ip veilnet_hostport
table ip veilnet_hostport {
\tset hairpin {
\t\ttype ipv4_addr . ipv4_addr
\t\telements = { 10.244.1.5 . 10.244.1.5, 10.244.1.6 . 10.244.1.6 }
\t}
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tfib daddr type local ip daddr != 127.0.0.0/8 jump hostports
\t}
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tfib daddr type local ip daddr != 127.0.0.0/8 jump hostports
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tct status dnat ip saddr . ip daddr @hairpin masquerade
\t}
\tchain hostports {
\t\ttcp dport 8080 dnat to 10.244.1.5:80 comment \"veilnet-hostport a eth0 8080/tcp\"
\t\tudp dport 53 dnat to 10.244.1.6:5353 comment \"veilnet-hostport b eth0 53/udp\"
\t\tip daddr 192.0.2.1 tcp dport 8443 dnat to 10.244.1.6:443 comment \"veilnet-hostport b eth0 192.0.2.1:8443/tcp\"
\t}
}
";
        assert_eq!(plan(&entries), expected);
        // Nothing left: the table goes.
        assert_eq!(
            plan(&entries[2..]),
            "table ip veilnet_hostport\ndelete table ip veilnet_hostport\n"
        );
        assert_eq!(plan(&[]), plan(&entries[2..]));
    }

    #[test]
    fn check_finds_rules_by_comment() {
        use Protocol::*;
        let e = entry("a", "10.244.1.5", vec![m(8080, 80, Tcp, None)]);
        let listing = "table ip veilnet_hostport {\n\tchain hostports {\n\t\ttcp dport 8080 dnat to 10.244.1.5:80 comment \"veilnet-hostport a eth0 8080/tcp\"\n\t}\n}\n";
        assert_eq!(missing_in(Some(listing), &e), None);
        assert!(missing_in(None, &e).unwrap().contains("8080/tcp"));
        let moved = entry("a", "10.244.1.9", vec![m(8080, 80, Tcp, None)]);
        assert!(missing_in(Some(listing), &moved).is_some());
    }
}
