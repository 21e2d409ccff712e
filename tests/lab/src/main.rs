//! The `veilnet-lab` binary: the lab's commands and daemons, and the benchmarks. Users reach it as
//! `veilnet lab …` and `veilnet bench …` (the `veilnet` binary hands off to it); the lab's own
//! daemons run it directly.

use clap::{Parser, Subcommand};
use veilnet::logging::{self, LogFormat};
use veilnet_lab::bench::{self, BenchCommand};
use veilnet_lab::cli::{self, LabCommand};

#[derive(Debug, Parser)]
#[command(
    name = "veilnet-lab",
    version,
    about = "Run a whole multi-node veilnet cluster in network namespaces on this machine"
)]
struct Cli {
    /// Log format (logs go to stderr).
    #[arg(long, global = true, value_enum, env = "VEILNET_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Marks a lab daemon's command line so later commands can find it again (set by `up`).
    #[arg(long, global = true, hide = true)]
    lab_role: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Lab(LabCommand),
    /// Benchmarks (used by scripts/bench-*.sh).
    #[command(subcommand, hide = true)]
    Bench(BenchCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Daemons log what they do; one-shot commands report errors themselves and stay quiet.
    let default_level = match &cli.command {
        Command::Lab(cmd) if cmd.is_daemon() => "info",
        _ => "warn,kube_client=off",
    };
    logging::init(cli.log_format.unwrap_or_default(), default_level);
    match cli.command {
        Command::Lab(cmd) => cli::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
    }
}
