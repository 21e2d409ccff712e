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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use super::readiness::write_waiting;

const TUN_PATH: &str = "/dev/net/tun";

// The ioctls that take a `struct ifreq` (<linux/if_tun.h>, <linux/sockios.h>; stable kernel
// ABI). Neither nix nor rustix wraps the TUN ioctls or these interface ones, so nix's macros
// generate typed (still `unsafe`) callers, all funnelled through [`ifreq_ioctl`].
nix::ioctl_readwrite_bad!(tun_set_iff, libc::TUNSETIFF, IfReq);
nix::ioctl_readwrite_bad!(siocgifflags, libc::SIOCGIFFLAGS, IfReq);
nix::ioctl_readwrite_bad!(siocsifflags, libc::SIOCSIFFLAGS, IfReq);
nix::ioctl_readwrite_bad!(siocsifmtu, libc::SIOCSIFMTU, IfReq);

/// A typed caller of one of the `struct ifreq` ioctls above.
type IfReqIoctl = unsafe fn(libc::c_int, *mut IfReq) -> nix::Result<libc::c_int>;

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

/// `struct ifreq` as the kernel reads it: the interface name, then a 24-byte union of which these
/// ioctls use the leading `short` (flags) or `int` (MTU), in native byte order. Plain bytes, so
/// it is built and read without `unsafe` (`libc::ifreq`'s union is not).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    ifru: [u8; 24],
}

// The kernel copies exactly `sizeof(struct ifreq)` bytes in and out.
const _: () = assert!(std::mem::size_of::<IfReq>() == std::mem::size_of::<libc::ifreq>());

impl IfReq {
    /// The name (validated by the callers: shorter than IFNAMSIZ, so NUL-terminated).
    fn name(&self) -> String {
        CStr::from_bytes_until_nul(&self.name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn flags(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.ifru[0], self.ifru[1]])
    }

    fn set_flags(&mut self, flags: libc::c_short) {
        self.ifru[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    fn set_int(&mut self, value: libc::c_int) {
        self.ifru[..4].copy_from_slice(&value.to_ne_bytes());
    }
}

fn ifreq_for(name: &str) -> IfReq {
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        ifru: [0; 24],
    };
    for (dst, src) in req.name.iter_mut().zip(name.as_bytes()) {
        *dst = *src;
    }
    req
}

/// Runs one of the `struct ifreq` ioctls on `fd`.
fn ifreq_ioctl(fd: BorrowedFd<'_>, ioctl: IfReqIoctl, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: every `IfReqIoctl` (TUNSETIFF, SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFMTU) reads and
    // writes at most one `struct ifreq`, and `req` is one (size checked above), exclusively
    // borrowed for the call; `fd` is open for its duration.
    unsafe { ioctl(fd.as_raw_fd(), req) }?;
    Ok(())
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

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Reads one packet (`virtio_net_hdr` first) if one is ready (`WouldBlock` otherwise).
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one packet (`virtio_net_hdr` first). A TUN takes writes without blocking in
    /// practice; should it refuse, we wait a bounded time for space rather than spin or drop.
    pub fn send(&self, packet: &[u8]) -> io::Result<usize> {
        write_waiting(self.file.as_fd(), WRITE_WAIT, || (&self.file).write(packet))
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
    req.set_flags(flags as libc::c_short);
    ifreq_ioctl(file.as_fd(), tun_set_iff, &mut req).map_err(|source| TunError::SetIff {
        name: name.to_string(),
        source,
    })?;
    // The kernel may have adjusted the name (it does not for a literal name, but read it back
    // rather than assume).
    Ok((file, req.name()))
}

/// A TUN ioctl that takes its argument by value (TUNSETPERSIST, TUNSETOFFLOAD).
///
/// Plain `libc::ioctl`, not nix's `ioctl_write_int_bad!`: that one passes a C `int`, and these
/// requests read an `unsigned long` whose upper half would then be unspecified.
fn tun_ioctl(file: &File, request: libc::Ioctl, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: both requests take an integer by value, no pointer; the fd is open for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, arg) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs an interface ioctl on a throwaway socket (in the calling thread's namespace).
fn interface_ioctl(
    name: &str,
    op: &'static str,
    ioctl: IfReqIoctl,
    req: &mut IfReq,
) -> Result<(), TunError> {
    let err = |source| TunError::Ioctl {
        op,
        name: name.to_string(),
        source,
    };
    let sock: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| err(e.into()))?;
    ifreq_ioctl(sock.as_fd(), ioctl, req).map_err(err)
}

/// Sets the MTU of interface `name`.
pub(crate) fn set_mtu(name: &str, mtu: u32) -> Result<(), TunError> {
    let mut req = ifreq_for(name);
    req.set_int(mtu as libc::c_int);
    interface_ioctl(name, "SIOCSIFMTU", siocsifmtu, &mut req)
}

/// Sets IFF_UP on interface `name`, keeping its other flags.
pub(crate) fn set_up(name: &str) -> Result<(), TunError> {
    let mut req = ifreq_for(name);
    interface_ioctl(name, "SIOCGIFFLAGS", siocgifflags, &mut req)?;
    let flags = req.flags();
    req.set_flags(flags | libc::IFF_UP as libc::c_short);
    interface_ioctl(name, "SIOCSIFFLAGS", siocsifflags, &mut req)
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
    fn ifreq_carries_the_name_and_native_endian_values() {
        let mut req = ifreq_for("veilwg0");
        assert_eq!(req.name(), "veilwg0");
        assert_eq!(req.name[7], 0);
        req.set_flags(0x1003);
        assert_eq!(req.flags(), 0x1003);
        req.set_int(1420);
        assert_eq!(&req.ifru[..4], &1420i32.to_ne_bytes());
        assert_eq!(req.ifru[4..], [0; 20]);
    }
}
