//! Host-local IPAM on disk: one file per allocated address, guarded by `flock`.
//!
//! Layout of `<stateDir>/ipam/<network>/`:
//! - `lock`: every operation holds an exclusive `flock` on it, so parallel ADDs never share an IP;
//! - `<ip>` (e.g. `10.250.0.7`): one record per allocation, content `containerID\nifname\n`,
//!   written to a dot-prefixed temp file and renamed into place, so a record is never torn;
//! - `last_reserved_ip`: where the round-robin search resumes (like host-local), so a freed
//!   address is not reused immediately.
//!
//! A record file whose content cannot be parsed keeps its address reserved (we cannot prove it
//! is free) and is reported on stderr; GC removes it, since it matches no valid attachment.
//!
//! The allocation choice itself ([`Pool::next_free`]) is pure and unit-tested without a disk.

use std::collections::HashSet;
use std::fs::{self, File};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use nix::fcntl::Flock;

use crate::env::Attachment;

/// The largest pool we manage: every allocation scans the records, so keep pools node-sized.
pub const MIN_PREFIX_LEN: u8 = 8;

const LOCK_FILE: &str = "lock";
const LAST_RESERVED_FILE: &str = "last_reserved_ip";

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no free address left in {subnet} ({capacity} usable)")]
    Exhausted { subnet: Ipv4Net, capacity: u32 },
    #[error("pod network {subnet} with gateway {gateway} leaves no address for pods")]
    PoolTooSmall { subnet: Ipv4Net, gateway: Ipv4Addr },
    #[error("pod network {subnet} is larger than /{MIN_PREFIX_LEN}")]
    PoolTooLarge { subnet: Ipv4Net },
    /// The `ips` capability asked for an address no pod may hold here.
    #[error("requested address {ip} cannot be given to a pod: {reason}")]
    RequestedInvalid { ip: Ipv4Addr, reason: String },
    /// The `ips` capability asked for an address another attachment holds.
    #[error("requested address {ip} is already taken by container {holder}")]
    RequestedTaken { ip: Ipv4Addr, holder: String },
}

type Result<T> = std::result::Result<T, IpamError>;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IpamError {
    let path = path.to_path_buf();
    move |source| IpamError::Io { op, path, source }
}

/// The addresses pods may get: the subnet's hosts minus the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
}

impl Pool {
    pub fn new(subnet: Ipv4Net, gateway: Ipv4Addr) -> Result<Pool> {
        let pool = Pool {
            subnet: subnet.trunc(),
            gateway,
        };
        if subnet.prefix_len() < MIN_PREFIX_LEN {
            return Err(IpamError::PoolTooLarge { subnet });
        }
        if pool.capacity() == 0 {
            return Err(IpamError::PoolTooSmall { subnet, gateway });
        }
        Ok(pool)
    }

    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// First and last host address (network and broadcast excluded).
    fn host_bounds(&self) -> Option<(u32, u32)> {
        if self.subnet.prefix_len() >= 31 {
            return None;
        }
        Some((
            u32::from(self.subnet.network()) + 1,
            u32::from(self.subnet.broadcast()) - 1,
        ))
    }

    /// Why `ip` cannot be requested by a pod, if it cannot (the `ips` capability).
    pub fn refuse_request(&self, ip: Ipv4Addr) -> Option<String> {
        let subnet = self.subnet;
        if !subnet.contains(&ip) {
            Some(format!("outside this node's pod CIDR {subnet}"))
        } else if ip == subnet.network() {
            Some(format!("it is the network address of {subnet}"))
        } else if ip == subnet.broadcast() {
            Some(format!("it is the broadcast address of {subnet}"))
        } else if ip == self.gateway {
            Some(format!("it is the gateway of {subnet}"))
        } else if !self.is_assignable(ip) {
            Some(format!("not a host address of {subnet}"))
        } else {
            None
        }
    }

    /// True for addresses a pod may hold.
    pub fn is_assignable(&self, ip: Ipv4Addr) -> bool {
        match self.host_bounds() {
            Some((first, last)) => {
                let n = u32::from(ip);
                (first..=last).contains(&n) && ip != self.gateway
            }
            None => false,
        }
    }

    /// How many addresses pods may get.
    pub fn capacity(&self) -> u32 {
        match self.host_bounds() {
            Some((first, last)) => {
                let hosts = last - first + 1;
                hosts - u32::from(self.is_host(self.gateway))
            }
            None => 0,
        }
    }

    fn is_host(&self, ip: Ipv4Addr) -> bool {
        self.host_bounds()
            .is_some_and(|(first, last)| (first..=last).contains(&u32::from(ip)))
    }

    /// Round robin like host-local: the first assignable, unreserved address after `last`
    /// (wrapping), or from the start when `last` is unknown or outside the pool.
    pub fn next_free(
        &self,
        reserved: &HashSet<Ipv4Addr>,
        last: Option<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        let (first, end) = self.host_bounds()?;
        let hosts = u64::from(end - first) + 1;
        let start = match last {
            Some(ip) if self.is_host(ip) => {
                let n = u32::from(ip);
                if n == end {
                    first
                } else {
                    n + 1
                }
            }
            _ => first,
        };
        // u64: offset + step may exceed u32 for large pools.
        let offset = u64::from(start - first);
        (0..hosts)
            .map(|step| first as u64 + (offset + step) % hosts)
            .filter_map(|n| u32::try_from(n).ok())
            .map(Ipv4Addr::from)
            .find(|ip| *ip != self.gateway && !reserved.contains(ip))
    }
}

/// One allocation record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub ip: Ipv4Addr,
    pub attachment: Attachment,
}

/// What a scan of the directory found.
#[derive(Debug, Default)]
struct Scan {
    records: Vec<Record>,
    /// Address files whose content is unreadable: reserved, owner unknown.
    corrupt: Vec<(Ipv4Addr, String)>,
    /// Leftover temp files from a crash mid-write.
    temp_files: Vec<PathBuf>,
}

impl Scan {
    fn reserved(&self) -> HashSet<Ipv4Addr> {
        self.records
            .iter()
            .map(|r| r.ip)
            .chain(self.corrupt.iter().map(|(ip, _)| *ip))
            .collect()
    }

    fn find(&self, attachment: &Attachment) -> Option<Ipv4Addr> {
        self.records
            .iter()
            .find(|r| &r.attachment == attachment)
            .map(|r| r.ip)
    }
}

/// Result of [`IpamStore::allocate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    /// The attachment already held this address (a repeated ADD).
    pub existing: bool,
}

/// Result of [`IpamStore::gc`].
#[derive(Debug, Default)]
pub struct GcReport {
    pub released: Vec<Record>,
    pub removed_corrupt: Vec<Ipv4Addr>,
    /// Failures to remove individual files; GC keeps going past them.
    pub errors: Vec<IpamError>,
}

/// The allocation store of one network.
#[derive(Debug, Clone)]
pub struct IpamStore {
    dir: PathBuf,
}

/// Holds the exclusive lock for the duration of one operation.
struct Locked<'a> {
    dir: &'a Path,
    _lock: Flock<File>,
}

impl IpamStore {
    /// The store of network `network` under `state_dir` (nothing is touched until used).
    pub fn new(state_dir: &Path, network: &str) -> IpamStore {
        IpamStore {
            dir: state_dir.join("ipam").join(network),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> Result<Locked<'_>> {
        let lock = crate::fsutil::lock_exclusive(&self.dir, LOCK_FILE)
            .map_err(|(op, path, source)| IpamError::Io { op, path, source })?;
        Ok(Locked {
            dir: &self.dir,
            _lock: lock,
        })
    }

    /// Gives `attachment` an address: the one it already holds, or the next free one.
    pub fn allocate(&self, pool: &Pool, attachment: &Attachment) -> Result<Allocation> {
        let locked = self.lock()?;
        let scan = locked.scan()?;
        if let Some(ip) = scan.find(attachment) {
            return Ok(Allocation { ip, existing: true });
        }
        let ip = pool
            .next_free(&scan.reserved(), locked.last_reserved())
            .ok_or(IpamError::Exhausted {
                subnet: pool.subnet(),
                capacity: pool.capacity(),
            })?;
        locked.write_record(ip, attachment)?;
        // Only a hint for the next search; losing it costs fairness, not correctness.
        if let Err(e) = locked.write_last_reserved(ip) {
            eprintln!("veilnet-cni: warning: {e}");
        }
        Ok(Allocation {
            ip,
            existing: false,
        })
    }

    /// Gives `attachment` exactly `ip` (the `ips` capability), under the same lock and in the
    /// same record format as [`IpamStore::allocate`], so requested and dynamic addresses never
    /// collide. A repeated ADD that already holds `ip` gets it again; an address another
    /// attachment holds (or a corrupt record keeps reserved) is refused.
    pub fn allocate_requested(
        &self,
        pool: &Pool,
        attachment: &Attachment,
        ip: Ipv4Addr,
    ) -> Result<Allocation> {
        if let Some(reason) = pool.refuse_request(ip) {
            return Err(IpamError::RequestedInvalid { ip, reason });
        }
        let locked = self.lock()?;
        let scan = locked.scan()?;
        match scan.find(attachment) {
            Some(held) if held == ip => return Ok(Allocation { ip, existing: true }),
            Some(held) => {
                return Err(IpamError::RequestedInvalid {
                    ip,
                    reason: format!(
                        "this attachment already holds {held}; delete it before asking for another address"
                    ),
                })
            }
            None => {}
        }
        if let Some(record) = scan.records.iter().find(|r| r.ip == ip) {
            return Err(IpamError::RequestedTaken {
                ip,
                holder: format!(
                    "{} ({})",
                    record.attachment.container_id, record.attachment.ifname
                ),
            });
        }
        if scan.corrupt.iter().any(|(c, _)| *c == ip) {
            return Err(IpamError::RequestedTaken {
                ip,
                holder: "unknown (unreadable IPAM record, freed by the next GC)".into(),
            });
        }
        locked.write_record(ip, attachment)?;
        Ok(Allocation {
            ip,
            existing: false,
        })
    }

    /// Releases every address `attachment` holds (normally one). Nothing held is fine.
    pub fn release(&self, attachment: &Attachment) -> Result<Vec<Ipv4Addr>> {
        let locked = self.lock()?;
        let scan = locked.scan()?;
        let mut released = Vec::new();
        for record in scan.records.iter().filter(|r| &r.attachment == attachment) {
            locked.remove(record.ip)?;
            released.push(record.ip);
        }
        Ok(released)
    }

    /// The address `attachment` holds, if any.
    pub fn lookup(&self, attachment: &Attachment) -> Result<Option<Ipv4Addr>> {
        let locked = self.lock()?;
        Ok(locked.scan()?.find(attachment))
    }

    /// Every record, sorted by address (for tests and diagnostics).
    pub fn records(&self) -> Result<Vec<Record>> {
        let locked = self.lock()?;
        let mut records = locked.scan()?.records;
        records.sort_by_key(|r| r.ip);
        Ok(records)
    }

    /// How many of the pool's addresses are taken.
    pub fn used(&self, pool: &Pool) -> Result<u32> {
        let locked = self.lock()?;
        let reserved = locked.scan()?.reserved();
        Ok(reserved
            .iter()
            .filter(|ip| pool.is_assignable(**ip))
            .count() as u32)
    }

    /// Releases every record whose attachment is not in `valid`, plus corrupt records and
    /// leftover temp files. Keeps going past individual failures.
    pub fn gc(&self, valid: &HashSet<Attachment>) -> Result<GcReport> {
        let locked = self.lock()?;
        let scan = locked.scan()?;
        let mut report = GcReport::default();
        for record in scan.records {
            if valid.contains(&record.attachment) {
                continue;
            }
            match locked.remove(record.ip) {
                Ok(()) => report.released.push(record),
                Err(e) => report.errors.push(e),
            }
        }
        for (ip, _) in scan.corrupt {
            match locked.remove(ip) {
                Ok(()) => report.removed_corrupt.push(ip),
                Err(e) => report.errors.push(e),
            }
        }
        for tmp in scan.temp_files {
            if let Err(source) = fs::remove_file(&tmp) {
                if source.kind() != std::io::ErrorKind::NotFound {
                    report.errors.push(IpamError::Io {
                        op: "remove",
                        path: tmp,
                        source,
                    });
                }
            }
        }
        Ok(report)
    }
}

impl Locked<'_> {
    fn scan(&self) -> Result<Scan> {
        let mut scan = Scan::default();
        let entries = fs::read_dir(self.dir).map_err(io_err("read directory", self.dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err("read directory", self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                if name.starts_with(crate::fsutil::TMP_PREFIX) {
                    scan.temp_files.push(entry.path());
                }
                continue;
            }
            // Only files named like an address are records; ignore anything else.
            let Ok(ip) = name.parse::<Ipv4Addr>() else {
                continue;
            };
            let path = entry.path();
            match fs::read(&path) {
                Ok(bytes) => match parse_record(&bytes) {
                    Some(attachment) => scan.records.push(Record { ip, attachment }),
                    None => {
                        eprintln!(
                            "veilnet-cni: warning: IPAM record {} is corrupt; keeping {ip} reserved until GC",
                            path.display()
                        );
                        scan.corrupt.push((ip, "unparsable content".into()));
                    }
                },
                // Removed between readdir and read: it is free now.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    eprintln!(
                        "veilnet-cni: warning: cannot read IPAM record {}: {e}; keeping {ip} reserved",
                        path.display()
                    );
                    scan.corrupt.push((ip, e.to_string()));
                }
            }
        }
        Ok(scan)
    }

    fn last_reserved(&self) -> Option<Ipv4Addr> {
        fs::read_to_string(self.dir.join(LAST_RESERVED_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn write_record(&self, ip: Ipv4Addr, attachment: &Attachment) -> Result<()> {
        let body = format!("{}\n{}\n", attachment.container_id, attachment.ifname);
        self.write_atomic(&ip.to_string(), body.as_bytes())
    }

    fn write_last_reserved(&self, ip: Ipv4Addr) -> Result<()> {
        self.write_atomic(LAST_RESERVED_FILE, ip.to_string().as_bytes())
    }

    /// Temp file + rename: a reader (or a crash) sees the old state or the new one, never half.
    /// No fsync: after a power loss every pod on the node is gone anyway, and a record that
    /// comes back empty is treated as corrupt (reserved until GC), never as free.
    fn write_atomic(&self, name: &str, body: &[u8]) -> Result<()> {
        let path = self.dir.join(name);
        crate::fsutil::write_atomic(&path, body, crate::fsutil::WriteOptions::STATE).map_err(
            |source| IpamError::Io {
                op: "write",
                path,
                source,
            },
        )
    }

    fn remove(&self, ip: Ipv4Addr) -> Result<()> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(IpamError::Io {
                op: "remove",
                path,
                source,
            }),
        }
    }
}

/// `containerID\nifname\n`; anything else is corrupt.
fn parse_record(bytes: &[u8]) -> Option<Attachment> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut lines = text.lines().map(str::trim);
    let container_id = lines.next().filter(|s| !s.is_empty())?;
    let ifname = lines.next().filter(|s| !s.is_empty())?;
    if lines.any(|l| !l.is_empty()) {
        return None;
    }
    Some(Attachment {
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn pool(subnet: &str, gw: &str) -> Pool {
        Pool::new(subnet.parse().unwrap(), ip(gw)).unwrap()
    }

    fn att(cid: &str) -> Attachment {
        Attachment {
            container_id: cid.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn pool_bounds() {
        let p = pool("10.0.0.0/24", "10.0.0.1");
        assert_eq!(p.capacity(), 253);
        assert!(!p.is_assignable(ip("10.0.0.0")));
        assert!(!p.is_assignable(ip("10.0.0.1")));
        assert!(p.is_assignable(ip("10.0.0.2")));
        assert!(p.is_assignable(ip("10.0.0.254")));
        assert!(!p.is_assignable(ip("10.0.0.255")));
        assert!(!p.is_assignable(ip("10.0.1.2")));
        assert_eq!(pool("10.0.0.0/30", "10.0.0.1").capacity(), 1);
        assert!(matches!(
            Pool::new("10.0.0.0/7".parse().unwrap(), ip("10.0.0.1")),
            Err(IpamError::PoolTooLarge { .. })
        ));
        let big = pool("10.0.0.0/8", "10.0.0.1");
        assert_eq!(big.capacity(), (1 << 24) - 3);
        assert_eq!(
            big.next_free(&HashSet::new(), Some(ip("10.255.255.254"))),
            Some(ip("10.0.0.2"))
        );
        assert!(matches!(
            Pool::new("10.0.0.0/31".parse().unwrap(), ip("10.0.0.0")),
            Err(IpamError::PoolTooSmall { .. })
        ));
    }

    #[test]
    fn next_free_skips_network_gateway_broadcast() {
        let p = pool("10.0.0.0/29", "10.0.0.1");
        let mut reserved = HashSet::new();
        let mut got = Vec::new();
        let mut last = None;
        while let Some(next) = p.next_free(&reserved, last) {
            reserved.insert(next);
            got.push(next.to_string());
            last = Some(next);
        }
        assert_eq!(
            got,
            ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
        );
    }

    #[test]
    fn next_free_round_robin_wraps() {
        let p = pool("10.0.0.0/29", "10.0.0.1");
        let reserved: HashSet<_> = [ip("10.0.0.3")].into();
        // Resumes after the last one, not at the lowest free address.
        assert_eq!(
            p.next_free(&reserved, Some(ip("10.0.0.4"))),
            Some(ip("10.0.0.5"))
        );
        // Wraps past the end, skipping the gateway.
        assert_eq!(
            p.next_free(&reserved, Some(ip("10.0.0.6"))),
            Some(ip("10.0.0.2"))
        );
        // A last address outside the pool restarts at the beginning.
        assert_eq!(
            p.next_free(&reserved, Some(ip("192.168.0.1"))),
            Some(ip("10.0.0.2"))
        );
    }

    #[test]
    fn gateway_in_the_middle() {
        let p = pool("10.0.0.0/29", "10.0.0.4");
        assert_eq!(p.capacity(), 5);
        assert_eq!(
            p.next_free(&HashSet::new(), Some(ip("10.0.0.3"))),
            Some(ip("10.0.0.5"))
        );
    }

    /// Issue 23.6(b): the plugin's temporary names were `.tmp.<file>.<pid>`, opened without
    /// `O_EXCL`/`O_NOFOLLOW`, so a symlink planted under that name redirected the write.
    #[test]
    fn symlinks_planted_in_the_store_never_redirect_a_write() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let store = IpamStore::new(dir.path(), "net");
        fs::create_dir_all(store.dir()).unwrap();
        let pid = std::process::id();
        for name in ["10.0.0.2", "10.0.0.3", LAST_RESERVED_FILE, LOCK_FILE] {
            symlink(&victim, store.dir().join(format!(".tmp.{name}.{pid}"))).unwrap();
        }
        // The old temporary names: the writes still succeed, elsewhere.
        let p = pool("10.0.0.0/24", "10.0.0.1");
        assert_eq!(store.allocate(&p, &att("a")).unwrap().ip, ip("10.0.0.2"));
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(store.lookup(&att("a")).unwrap(), Some(ip("10.0.0.2")));
        // The target itself a symlink (the round-robin hint): that write is refused (a warning:
        // the hint is optional), the record is written, the outside file untouched.
        let hint = store.dir().join(LAST_RESERVED_FILE);
        fs::remove_file(&hint).unwrap();
        symlink(&victim, &hint).unwrap();
        assert_eq!(store.allocate(&p, &att("b")).unwrap().ip, ip("10.0.0.3"));
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(fs::symlink_metadata(&hint)
            .unwrap()
            .file_type()
            .is_symlink());
        // The lock file a symlink: refused, not followed.
        let locks = tempfile::tempdir().unwrap();
        let store = IpamStore::new(locks.path(), "net");
        fs::create_dir_all(store.dir()).unwrap();
        symlink(outside.path().join("created"), store.dir().join(LOCK_FILE)).unwrap();
        assert!(store.allocate(&p, &att("c")).is_err());
        assert!(!outside.path().join("created").exists());
    }

    #[test]
    fn allocate_is_idempotent_and_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path(), "net");
        let p = pool("10.0.0.0/24", "10.0.0.1");
        let a = store.allocate(&p, &att("a")).unwrap();
        assert_eq!(
            a,
            Allocation {
                ip: ip("10.0.0.2"),
                existing: false
            }
        );
        assert_eq!(
            store.allocate(&p, &att("a")).unwrap(),
            Allocation {
                ip: ip("10.0.0.2"),
                existing: true
            }
        );
        let b = store.allocate(&p, &att("b")).unwrap();
        assert_eq!(b.ip, ip("10.0.0.3"));
        // Same container, other interface: another address.
        let a1 = Attachment {
            container_id: "a".into(),
            ifname: "net1".into(),
        };
        assert_eq!(store.allocate(&p, &a1).unwrap().ip, ip("10.0.0.4"));
        assert_eq!(store.lookup(&att("b")).unwrap(), Some(ip("10.0.0.3")));
        assert_eq!(store.used(&p).unwrap(), 3);
        let on_disk = fs::read_to_string(dir.path().join("ipam/net/10.0.0.2")).unwrap();
        assert_eq!(on_disk, "a\neth0\n");
    }

    #[test]
    fn release_and_round_robin() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path(), "net");
        let p = pool("10.0.0.0/29", "10.0.0.1");
        for c in ["a", "b", "c"] {
            store.allocate(&p, &att(c)).unwrap();
        }
        assert_eq!(store.release(&att("a")).unwrap(), vec![ip("10.0.0.2")]);
        assert!(store.release(&att("a")).unwrap().is_empty());
        assert_eq!(store.lookup(&att("a")).unwrap(), None);
        // The freed .2 is not reused right away.
        assert_eq!(store.allocate(&p, &att("d")).unwrap().ip, ip("10.0.0.5"));
        assert_eq!(store.allocate(&p, &att("e")).unwrap().ip, ip("10.0.0.6"));
        assert_eq!(store.allocate(&p, &att("f")).unwrap().ip, ip("10.0.0.2"));
    }

    #[test]
    fn exhaustion() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path(), "net");
        let p = pool("10.0.0.0/30", "10.0.0.1");
        assert_eq!(store.allocate(&p, &att("a")).unwrap().ip, ip("10.0.0.2"));
        assert!(matches!(
            store.allocate(&p, &att("b")),
            Err(IpamError::Exhausted { capacity: 1, .. })
        ));
        // The holder can still ask again.
        assert!(store.allocate(&p, &att("a")).unwrap().existing);
        store.release(&att("a")).unwrap();
        assert_eq!(store.allocate(&p, &att("b")).unwrap().ip, ip("10.0.0.2"));
    }

    #[test]
    fn corrupt_records_stay_reserved_until_gc() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path(), "net");
        let p = pool("10.0.0.0/29", "10.0.0.1");
        fs::create_dir_all(store.dir()).unwrap();
        fs::write(store.dir().join("10.0.0.2"), b"").unwrap();
        fs::write(store.dir().join("10.0.0.3"), b"\xff\xfe\n").unwrap();
        fs::write(store.dir().join("10.0.0.4"), b"a\neth0\nextra\n").unwrap();
        fs::write(store.dir().join("not-an-ip"), b"whatever").unwrap();
        fs::write(store.dir().join(LAST_RESERVED_FILE), b"garbage").unwrap();
        fs::write(store.dir().join(".tmp.10.0.0.6.123"), b"half").unwrap();
        assert_eq!(store.allocate(&p, &att("a")).unwrap().ip, ip("10.0.0.5"));
        assert_eq!(store.used(&p).unwrap(), 4);

        let valid: HashSet<_> = [att("a")].into();
        let report = store.gc(&valid).unwrap();
        assert!(report.errors.is_empty());
        assert!(report.released.is_empty());
        let mut removed = report.removed_corrupt.clone();
        removed.sort();
        assert_eq!(
            removed,
            vec![ip("10.0.0.2"), ip("10.0.0.3"), ip("10.0.0.4")]
        );
        assert!(!store.dir().join(".tmp.10.0.0.6.123").exists());
        assert!(store.dir().join("not-an-ip").exists());
        assert_eq!(store.used(&p).unwrap(), 1);
    }

    #[test]
    fn gc_releases_stale() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path(), "net");
        let p = pool("10.0.0.0/24", "10.0.0.1");
        for c in ["a", "b", "c", "d"] {
            store.allocate(&p, &att(c)).unwrap();
        }
        let valid: HashSet<_> = [att("b"), att("d"), att("zzz")].into();
        let report = store.gc(&valid).unwrap();
        let mut released: Vec<_> = report
            .released
            .iter()
            .map(|r| r.attachment.container_id.clone())
            .collect();
        released.sort();
        assert_eq!(released, vec!["a", "c"]);
        let left: Vec<_> = store
            .records()
            .unwrap()
            .into_iter()
            .map(|r| r.attachment.container_id)
            .collect();
        assert_eq!(left, vec!["b", "d"]);
        // GC with everything valid is a no-op; with nothing valid it empties the store.
        assert!(store.gc(&valid).unwrap().released.is_empty());
        assert_eq!(store.gc(&HashSet::new()).unwrap().released.len(), 2);
        assert!(store.records().unwrap().is_empty());
    }

    #[test]
    fn parallel_allocations_are_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool("10.0.0.0/24", "10.0.0.1");
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let store = IpamStore::new(dir.path(), "net");
                std::thread::spawn(move || store.allocate(&p, &att(&format!("c{i}"))).unwrap().ip)
            })
            .collect();
        let ips: HashSet<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(ips.len(), 32);
        assert!(ips.iter().all(|ip| p.is_assignable(*ip)));
    }

    #[test]
    fn requested_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path(), "net");
        let p = pool("10.0.0.0/24", "10.0.0.1");
        let got = store
            .allocate_requested(&p, &att("a"), ip("10.0.0.7"))
            .unwrap();
        assert_eq!(
            got,
            Allocation {
                ip: ip("10.0.0.7"),
                existing: false
            }
        );
        // Idempotent for its holder.
        assert!(
            store
                .allocate_requested(&p, &att("a"), ip("10.0.0.7"))
                .unwrap()
                .existing
        );
        // Taken: refused, naming the holder; nothing written for "b".
        let e = store
            .allocate_requested(&p, &att("b"), ip("10.0.0.7"))
            .unwrap_err();
        assert!(matches!(e, IpamError::RequestedTaken { .. }), "{e}");
        assert!(e.to_string().contains("10.0.0.7") && e.to_string().contains("a (eth0)"));
        assert_eq!(store.lookup(&att("b")).unwrap(), None);
        // Dynamic allocation skips a requested address.
        fs::write(store.dir().join(LAST_RESERVED_FILE), b"10.0.0.6").unwrap();
        assert_eq!(store.allocate(&p, &att("c")).unwrap().ip, ip("10.0.0.8"));
        // Out of range and special addresses, each with its reason.
        for (bad, why) in [
            ("10.0.1.5", "outside"),
            ("10.0.0.0", "network address"),
            ("10.0.0.255", "broadcast"),
            ("10.0.0.1", "gateway"),
        ] {
            let e = store
                .allocate_requested(&p, &att("d"), ip(bad))
                .unwrap_err();
            assert!(matches!(e, IpamError::RequestedInvalid { .. }), "{e}");
            assert!(
                e.to_string().contains(why) && e.to_string().contains(bad),
                "{e}"
            );
        }
        // Asking for another address while holding one: refused.
        assert!(store
            .allocate_requested(&p, &att("a"), ip("10.0.0.9"))
            .is_err());
        // A corrupt record keeps its address reserved.
        fs::write(store.dir().join("10.0.0.20"), b"").unwrap();
        assert!(matches!(
            store.allocate_requested(&p, &att("e"), ip("10.0.0.20")),
            Err(IpamError::RequestedTaken { .. })
        ));
        assert_eq!(store.records().unwrap().len(), 2);
    }

    #[test]
    fn record_parsing() {
        assert_eq!(parse_record(b"c1\neth0\n"), Some(att("c1")));
        assert_eq!(parse_record(b"c1\r\neth0"), Some(att("c1")));
        assert_eq!(parse_record(b"c1\n"), None);
        assert_eq!(parse_record(b"\neth0\n"), None);
    }
}
