//! Network sysctls of one namespace, through `/proc/sys`.
//!
//! `/proc/sys/net` shows the network namespace of the *thread* that opens it, so writes for
//! another namespace run on a thread that entered it (`netns::run_in`).

use std::path::PathBuf;

use super::KernelError;
use crate::netns;

/// `net.ipv4.ip_forward`: the node must route between the pod bridge and the overlay.
pub const IPV4_FORWARD: &str = "net.ipv4.ip_forward";
/// `net.ipv6.conf.all.forwarding`, for IPv6 pod CIDRs.
pub const IPV6_FORWARD: &str = "net.ipv6.conf.all.forwarding";

fn path_of(key: &str) -> Result<PathBuf, KernelError> {
    let valid = !key.is_empty()
        && key.starts_with("net.")
        && key
            .split('.')
            .all(|part| !part.is_empty() && part != ".." && !part.contains('/'))
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !valid {
        return Err(KernelError::BadSysctlKey {
            key: key.to_string(),
        });
    }
    Ok(PathBuf::from("/proc/sys").join(key.replace('.', "/")))
}

fn io_err(key: &str) -> impl Fn(std::io::Error) -> KernelError + '_ {
    move |source| KernelError::Sysctl {
        key: key.to_string(),
        source,
    }
}

fn read_here(key: &str) -> Result<String, KernelError> {
    let path = path_of(key)?;
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(io_err(key))
}

/// Writes only when the value differs, so repeated calls change nothing. Returns whether it wrote.
fn ensure_here(key: &str, value: &str) -> Result<bool, KernelError> {
    if read_here(key)? == value {
        return Ok(false);
    }
    std::fs::write(path_of(key)?, value).map_err(io_err(key))?;
    Ok(true)
}

/// Reads a `net.*` sysctl in `netns` (or the caller's namespace when `None`).
pub fn read(netns_name: Option<&str>, key: &str) -> Result<String, KernelError> {
    match netns_name {
        None => read_here(key),
        Some(ns) => {
            let key = key.to_string();
            netns::run_in(ns, move || read_here(&key))?
        }
    }
}

/// Sets a `net.*` sysctl in `netns` (or the caller's namespace when `None`) if it differs.
/// Returns whether a write happened.
pub fn ensure(netns_name: Option<&str>, key: &str, value: &str) -> Result<bool, KernelError> {
    match netns_name {
        None => ensure_here(key, value),
        Some(ns) => {
            let (key, value) = (key.to_string(), value.to_string());
            netns::run_in(ns, move || ensure_here(&key, &value))?
        }
    }
}

/// Turns on IPv4 forwarding, and IPv6 forwarding when the node has IPv6 pod CIDRs.
pub fn enable_forwarding(netns_name: Option<&str>, ipv6: bool) -> Result<(), KernelError> {
    ensure(netns_name, IPV4_FORWARD, "1")?;
    if ipv6 {
        ensure(netns_name, IPV6_FORWARD, "1")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_proc_sys_and_are_confined_to_net() {
        assert_eq!(
            path_of("net.ipv4.ip_forward").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            path_of("net.ipv4.conf.veil-br_0.rp_filter").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/conf/veil-br_0/rp_filter")
        );
        for bad in [
            "",
            "kernel.panic",
            "net..x",
            "net/ipv4",
            "net.ipv4.a b",
            "net.",
        ] {
            assert!(path_of(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reads_the_current_namespace() {
        // Read-only: never write the host's sysctls from unit tests.
        let v = read(None, IPV4_FORWARD).unwrap();
        assert!(v == "0" || v == "1", "{v}");
    }
}
