//! The TUN device: created (or attached) by name through `/dev/net/tun`, configured with ioctls
//! (MTU, up), and driven non-blocking by the datapath thread (see `worker`).
//!
//! `IFF_NO_PI`: packets are bare IP, the kernel tells v4 from v6 by the version nibble.
//! `IFF_VNET_HDR` + `TUNSETOFFLOAD`: every read and write starts with a `virtio_net_hdr`, and the
//! kernel may hand over TSO/USO super-packets with partial checksums (see `offload`). Offloads the
//! kernel refuses are dropped one by one (USO first, then TSO), down to plain packets.
//!
//! By default the device is not persistent, so it disappears with the last open file: a crashed
//! datapath leaves no interface behind (routes through it vanish with it, and pod traffic then has
//! no plaintext path either). A *persistent* device (`TUNSETPERSIST`) outlives us with its
//! addresses and routes; the next start attaches to it by name. Attaching re-applies our feature
//! flags (`IFF_NO_PI`, `IFF_VNET_HDR` are per device and simply overwritten), so the only
//! mismatch that can refuse the attach is the queue mode: a device created multi-queue is
//! attached as such rather than recreated, which would drop its routes.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use super::readiness::write_waiting;

const TUN_PATH: &str = "/dev/net/tun";

// ioctl request numbers from <linux/sockios.h>; stable kernel ABI.
const SIOCGIFFLAGS: libc::Ioctl = 0x8913;
const SIOCSIFFLAGS: libc::Ioctl = 0x8914;
const SIOCSIFMTU: libc::Ioctl = 0x8922;

#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("invalid TUN name {name:?}: 1 to 15 bytes, no '/', whitespace or NUL")]
    InvalidName { name: String },
    #[error("opening {TUN_PATH}: {source} (is the tun module available and are we root?)")]
    Open { source: io::Error },
    #[error("TUNSETIFF {name}: {source}")]
    SetIff { name: String, source: io::Error },
    #[error("{op} on {name}: {source}")]
    Ioctl {
        op: &'static str,
        name: String,
        source: io::Error,
    },
    #[error("MTU {mtu} is out of range (576..=65535)")]
    InvalidMtu { mtu: u32 },
}

/// An open TUN device.
pub struct Tun {
    file: File,
    name: String,
    /// The `TUN_F_*` offloads the kernel accepted.
    pub offloads: libc::c_uint,
}

/// Offload sets to try, best first.
const OFFLOAD_CHOICES: [libc::c_uint; 3] = [
    libc::TUN_F_CSUM
        | libc::TUN_F_TSO4
        | libc::TUN_F_TSO6
        | libc::TUN_F_TSO_ECN
        | libc::TUN_F_USO4
        | libc::TUN_F_USO6,
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN,
    0,
];

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun").field("name", &self.name).finish()
    }
}

fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    req
}

fn validate_name(name: &str) -> Result<(), TunError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && !name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(TunError::InvalidName {
            name: name.to_string(),
        })
    }
}

impl Tun {
    /// Creates the TUN `name` (or attaches to an existing persistent one), makes it persistent or
    /// not as asked, negotiates offloads, sets its MTU and brings it up. Must run on a thread in
    /// the target namespace.
    pub fn open(name: &str, mtu: u32, persistent: bool) -> Result<Tun, TunError> {
        validate_name(name)?;
        if !(576..=65535).contains(&mtu) {
            return Err(TunError::InvalidMtu { mtu });
        }
        let base = libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        let (file, actual) = match attach_retrying(name, base) {
            // EINVAL on an existing device: it was created multi-queue. Attach as one queue of it.
            Err(TunError::SetIff { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(
                    tun = name,
                    "existing TUN is multi-queue, attaching as one queue"
                );
                attach_retrying(name, base | libc::IFF_MULTI_QUEUE)?
            }
            other => other?,
        };
        let ioctl_err = |op: &'static str| {
            let name = actual.clone();
            move |source| TunError::Ioctl { op, name, source }
        };
        // Persistent or not, explicitly: a device left persistent by an earlier run must go away
        // with us when persistence is off now.
        tun_ioctl(
            &file,
            libc::TUNSETPERSIST,
            libc::c_int::from(persistent) as libc::c_ulong,
        )
        .map_err(ioctl_err("TUNSETPERSIST"))?;
        let mut offloads = 0;
        for choice in OFFLOAD_CHOICES {
            match tun_ioctl(&file, libc::TUNSETOFFLOAD, choice as libc::c_ulong) {
                Ok(()) => {
                    offloads = choice;
                    break;
                }
                Err(e) if choice == 0 => return Err(ioctl_err("TUNSETOFFLOAD")(e)),
                Err(_) => continue,
            }
        }
        set_mtu(&actual, mtu)?;
        set_up(&actual)?;
        Ok(Tun {
            file,
            name: actual,
            offloads,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Reads one packet (`virtio_net_hdr` first) if one is ready (`WouldBlock` otherwise).
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one packet (`virtio_net_hdr` first). A TUN takes writes without blocking in
    /// practice; should it refuse, we wait a bounded time for space rather than spin or drop.
    pub fn send(&self, packet: &[u8]) -> io::Result<usize> {
        write_waiting(self.raw_fd(), WRITE_WAIT, || (&self.file).write(packet))
    }
}

/// Longest wait for write space before a packet is given up.
const WRITE_WAIT: Duration = Duration::from_millis(100);

/// [`attach`], retried for a while on EBUSY: a persistent device is still held by the previous
/// datapath while it exits (an agent restart), and becomes free when its last descriptor closes.
fn attach_retrying(name: &str, flags: libc::c_int) -> Result<(File, String), TunError> {
    let deadline = std::time::Instant::now() + ATTACH_BUSY_WAIT;
    loop {
        match attach(name, flags) {
            Err(TunError::SetIff { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// How long [`attach_retrying`] waits for a busy device.
const ATTACH_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens `/dev/net/tun` and binds it to `name` with `flags` (creating the device if absent).
fn attach(name: &str, flags: libc::c_int) -> Result<(File, String), TunError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(|source| TunError::Open { source })?;
    let mut req = ifreq_for(name);
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(TunError::SetIff {
            name: name.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    // The kernel may have adjusted the name (it does not for a literal name, but read it back
    // rather than assume).
    // SAFETY: the kernel NUL-terminates ifr_name within IFNAMSIZ.
    let actual = unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    Ok((file, actual))
}

/// A TUN ioctl that takes its argument by value.
fn tun_ioctl(file: &File, request: libc::Ioctl, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST and TUNSETOFFLOAD take an integer argument, not a pointer.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, arg) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A throwaway socket for interface ioctls (in the calling thread's namespace).
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned immediately.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq_ioctl(
    name: &str,
    op: &'static str,
    request: libc::Ioctl,
    req: &mut libc::ifreq,
) -> Result<(), TunError> {
    let err = |source| TunError::Ioctl {
        op,
        name: name.to_string(),
        source,
    };
    let sock = control_socket().map_err(err)?;
    // SAFETY: every request used here takes a `struct ifreq`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, req as *mut libc::ifreq) };
    if rc < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

/// Sets the MTU of interface `name`.
pub(crate) fn set_mtu(name: &str, mtu: u32) -> Result<(), TunError> {
    let mut req = ifreq_for(name);
    req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    ifreq_ioctl(name, "SIOCSIFMTU", SIOCSIFMTU, &mut req)
}

/// Sets IFF_UP on interface `name`, keeping its other flags.
pub(crate) fn set_up(name: &str) -> Result<(), TunError> {
    let mut req = ifreq_for(name);
    ifreq_ioctl(name, "SIOCGIFFLAGS", SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ifreq_ioctl(name, "SIOCSIFFLAGS", SIOCSIFFLAGS, &mut req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(validate_name("veilwg0").is_ok());
        assert!(validate_name("123456789012345").is_ok());
        assert!(validate_name("1234567890123456").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("a b").is_err());
    }

    #[test]
    fn ifreq_carries_the_name() {
        let req = ifreq_for("veilwg0");
        let name = unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) };
        assert_eq!(name.to_str().unwrap(), "veilwg0");
    }
}
