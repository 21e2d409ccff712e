//! Benchmarks run by `scripts/bench-*.sh` (hidden `veilnet bench …` commands, handed off to
//! `veilnet-lab bench …`). They measure; they never assert: the numbers go into the closing notes
//! side by side.

pub mod cni;
pub mod policy;
pub mod relay;
pub mod scale;
pub mod wg;

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
