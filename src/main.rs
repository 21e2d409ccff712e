//! The `veilnet` binary: agent, lab and operator commands.

use clap::{Parser, Subcommand};
use veilnet::logging::{self, LogFormat};
use veilnet::{agent, lab};

#[derive(Debug, Parser)]
#[command(
    name = "veilnet",
    version,
    about = "Encrypted, isolated pod networking for Kubernetes"
)]
struct Cli {
    /// Log format (logs go to stderr).
    #[arg(long, global = true, value_enum, env = "VEILNET_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Marks a lab daemon's command line so `veilnet lab` can find it again (set by `lab up`).
    #[arg(long, global = true, hide = true)]
    lab_role: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show this node's agent: mode, peers, paths, handshakes, bytes, the path matrix.
    Status(veilnet::status_cmd::StatusArgs),
    /// Run the per-node agent (as the DaemonSet does, or inside a lab node).
    Agent(Box<agent::AgentArgs>),
    /// The WireGuard datapath: owns the TUN and sessions, configured by the agent over a socket.
    Datapath(veilnet::datapath::DatapathArgs),
    /// Benchmarks (used by scripts/bench-*.sh).
    #[command(subcommand, hide = true)]
    Bench(BenchCommand),
    /// Run a whole multi-node cluster in network namespaces on this machine.
    #[command(subcommand)]
    Lab(lab::cli::LabCommand),
    /// NetworkPolicy tools (`policy explain FROM TO PORT/PROTO`).
    #[command(subcommand)]
    Policy(veilnet::policy::cli::PolicyCommand),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// CNI ADD/DEL latency: veilnet-cni vs the reference bridge + host-local plugins.
    Cni(veilnet::bench::cni::CniBenchArgs),
    /// One userspace WireGuard device in this namespace until SIGTERM (used by scripts/bench.sh).
    WgNode(veilnet::bench::wg::WgNodeArgs),
    /// A no-crypto TUN/UDP relay: the RTT floor of a userspace datapath (scripts/bench.sh).
    TunRelay(veilnet::bench::relay::RelayArgs),
    /// NetworkPolicy sync and label-change time on a synthetic cluster.
    Policy(veilnet::bench::policy::PolicyBenchArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Daemons log what they do; one-shot commands report errors themselves and stay quiet.
    let default_level = match &cli.command {
        Command::Agent(_) | Command::Datapath(_) => "info",
        Command::Lab(cmd) if cmd.is_daemon() => "info",
        _ => "warn,kube_client=off",
    };
    // The agent's config file may set the format too; the flag and the environment win.
    let format = cli.log_format.or_else(|| match &cli.command {
        Command::Agent(args) => args.file_log_format(),
        _ => None,
    });
    logging::init(format.unwrap_or_default(), default_level);
    match cli.command {
        Command::Lab(cmd) => lab::cli::run(cmd),
        Command::Status(args) => veilnet::status_cmd::run(args),
        Command::Bench(BenchCommand::Cni(args)) => Ok(veilnet::bench::cni::run(args)?),
        Command::Bench(BenchCommand::WgNode(args)) => Ok(veilnet::bench::wg::run_node(args)?),
        Command::Bench(BenchCommand::TunRelay(args)) => Ok(veilnet::bench::relay::run(args)?),
        Command::Policy(cmd) => {
            println!("{}", veilnet::policy::cli::run(cmd)?);
            Ok(())
        }
        Command::Bench(BenchCommand::Policy(args)) => Ok(veilnet::bench::policy::run(args)?),
        Command::Datapath(args) => Ok(veilnet::datapath::run(args)?),
        Command::Agent(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(agent::run(*args))
            .map_err(Into::into),
    }
}
