//! Traffic shaping for the `bandwidth` capability, through iproute2's `tc`.
//!
//! Why `tc` and not netlink: `netlink-packet-route` 0.34 knows the ingress and fq_codel qdiscs
//! but not TBF, and a hand-built `TCA_TBF_PARMS` needs the kernel's psched tick rate and rate
//! tables that `tc` already computes correctly. `tc` runs in the namespace of the calling
//! thread (see [`crate::sandbox::PodNetns::run_in`] for the pod's).
//!
//! Both directions are a TBF qdisc:
//! - ingress (to the pod): root TBF on the host veth's egress, as the reference plugin does;
//! - egress (from the pod): root TBF on the pod's own interface's egress. The reference plugin
//!   redirects the host veth's ingress into an ifb device (or polices it), but both need tc
//!   actions (`act_mirred`, `act_police`) that kernels built without them lack (the lab's does),
//!   and an ifb is one more device to leak. A TBF on the pod end shapes (TCP backs off rather
//!   than losing packets to a policer) and vanishes with the veth. The cost: a pod with
//!   `CAP_NET_ADMIN` in its namespace can remove its own egress limit (ingress stays enforced).

use std::path::PathBuf;
use std::process::Command;

use crate::capabilities::Tbf;

#[derive(Debug, thiserror::Error)]
pub enum TcError {
    #[error("the bandwidth capability needs iproute2's tc, which is not installed (looked in /usr/sbin, /sbin, /usr/bin, /bin and PATH)")]
    Missing,
    #[error("tc {args}: {detail}")]
    Failed { args: String, detail: String },
}

fn binary() -> Result<PathBuf, TcError> {
    crate::fsutil::find_program("tc").ok_or(TcError::Missing)
}

fn run(args: &[String]) -> Result<String, TcError> {
    let joined = args.join(" ");
    let out = Command::new(binary()?)
        .args(args)
        .output()
        .map_err(|e| TcError::Failed {
            args: joined.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(TcError::Failed {
            args: joined,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `tc` arguments that install `tbf` as the root qdisc of `dev` (pure, for tests).
pub fn tbf_args(dev: &str, tbf: &Tbf) -> Vec<String> {
    [
        "qdisc",
        "replace",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        &format!("{}bit", tbf.rate_bits),
        // Plain numbers are bytes for tc's sizes.
        "burst",
        &tbf.burst_bytes.to_string(),
        "limit",
        &tbf.limit_bytes.to_string(),
    ]
    .map(str::to_string)
    .to_vec()
}

/// Installs `tbf` as the root qdisc of `dev` in the calling thread's namespace.
pub fn set_tbf(dev: &str, tbf: &Tbf) -> Result<(), TcError> {
    run(&tbf_args(dev, tbf)).map(drop)
}

/// The kind of `dev`'s root qdisc (`tbf`, `noqueue`, …), for CHECK and tests.
pub fn root_qdisc(dev: &str) -> Result<Option<String>, TcError> {
    let out = run(&["qdisc", "show", "dev", dev, "root"].map(str::to_string))?;
    Ok(out
        .lines()
        .find_map(|l| l.strip_prefix("qdisc "))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args() {
        let t = Tbf {
            rate_bits: 10_000_000,
            burst_bytes: 125_000,
            limit_bytes: 156_250,
        };
        assert_eq!(
            tbf_args("veil0123", &t).join(" "),
            "qdisc replace dev veil0123 root tbf rate 10000000bit burst 125000 limit 156250"
        );
    }
}
