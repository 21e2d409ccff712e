//! Benchmarks run by `scripts/bench-*.sh` (hidden `veilnet bench …` commands, handed off to
//! `veilnet-lab bench …`). They measure; they never assert: the numbers go into the closing notes
//! side by side.

pub mod cni;
pub mod policy;
pub mod relay;
pub mod scale;
pub mod wg;

use std::time::Duration;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// CNI ADD/DEL latency: veilnet-cni vs the reference bridge + host-local plugins.
    Cni(cni::CniBenchArgs),
    /// One userspace WireGuard device in this namespace until SIGTERM (used by scripts/bench.sh).
    WgNode(wg::WgNodeArgs),
    /// A no-crypto TUN/UDP relay: the RTT floor of a userspace datapath (scripts/bench.sh).
    TunRelay(relay::RelayArgs),
    /// NetworkPolicy sync and label-change time on a synthetic cluster.
    Policy(policy::PolicyBenchArgs),
    /// What a cluster of many Nodes costs one node: memory, convergence, one change, at rest.
    Scale(scale::ScaleBenchArgs),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Cni(args) => Ok(cni::run(args)?),
        BenchCommand::WgNode(args) => Ok(wg::run_node(args)?),
        BenchCommand::TunRelay(args) => Ok(relay::run(args)?),
        BenchCommand::Policy(args) => Ok(policy::run(args)?),
        BenchCommand::Scale(args) => Ok(scale::run(args)?),
    }
}

/// Milliseconds, for the benchmarks' tables.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `p`-th percentile (0–100) of sorted samples, nearest rank; zero when there are none.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(51));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
