//! The `veilnet` binary: agent, datapath and operator commands. `veilnet lab …` and
//! `veilnet bench …` hand off to the `veilnet-lab` binary (the test bed, not shipped).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use veilnet::agent;
use veilnet::logging::{self, LogFormat};

/// The lab's binary, built from `tests/lab` beside this one.
const LAB_BINARY: &str = "veilnet-lab";
/// glibc malloc arenas the agent may use (see veilnet::memory): its threads share two.
const AGENT_MALLOC_ARENAS: i32 = 2;

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
    /// Marks a daemon's command line so the lab that started it can find it again (otherwise
    /// ignored).
    #[arg(long, global = true, hide = true)]
    lab_role: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show this node's agent: mode, peers, paths, handshakes, bytes, the path matrix.
    Status(veilnet::status_cmd::StatusArgs),
    /// Check this node (kernel, CNI config, MTU, sysctls, agent and datapath, nftables, ports):
    /// one line per check with OK / WARN / FAIL and the fix; exit status 1 on any FAIL.
    Doctor(veilnet::doctor::DoctorArgs),
    /// Run the per-node agent (as the DaemonSet does, or inside a lab node).
    Agent(Box<agent::AgentArgs>),
    /// The WireGuard datapath: owns the TUN and sessions, configured by the agent over a socket.
    Datapath(veilnet::datapath::DatapathArgs),
    /// Benchmarks (used by scripts/bench-*.sh; run by the veilnet-lab binary).
    #[command(hide = true, disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run a whole multi-node cluster in network namespaces on this machine (the veilnet-lab
    /// binary; `veilnet lab --help` for its commands).
    #[command(disable_help_flag = true)]
    Lab {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Find what weakens isolation: hostNetwork, privileged, hostPort and NET_RAW pods, namespaces
    /// and pods without NetworkPolicy, unencrypted nodes. Exit status 1 when anything is found,
    /// 0 when clean, 2 when the cluster could not be read.
    Audit(veilnet::audit::cli::AuditArgs),
    /// Who talked to whom: every node's flow log merged, oldest first, filtered (namespace, pod,
    /// verdict, policy, encrypted, since), as a table or JSON lines; --follow for new lines.
    Observe(veilnet::observe::ObserveArgs),
    /// NetworkPolicy tools (`policy explain FROM TO PORT/PROTO`).
    #[command(subcommand)]
    Policy(veilnet::policy::cli::PolicyCommand),
    /// Print a shell completion script (`veilnet completions bash > /etc/bash_completion.d/veilnet`).
    Completions {
        /// The shell.
        shell: CompletionShell,
    },
    /// `kubectl veilnet …`: what the binary does when run as `kubectl-veilnet`
    /// (`veilnet kubectl-plugin --help`).
    #[command(disable_help_flag = true)]
    KubectlPlugin {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
}

/// The command line, with the agent's defaults in its help.
fn cli_command() -> clap::Command {
    Cli::command().mut_subcommand("agent", agent::config::show_defaults)
}

/// `kubectl veilnet ARGS…`; `args` without the program name.
fn kubectl_plugin(args: impl IntoIterator<Item = OsString>) -> ! {
    use veilnet::kubectl_plugin::{run, PluginCli};
    let cli = PluginCli::parse_from(std::iter::once(OsString::from("kubectl veilnet")).chain(args));
    logging::init(LogFormat::default(), "warn,kube_client=off");
    match run(cli) {
        Ok((out, code)) => {
            let written = if out.is_empty() {
                Ok(())
            } else {
                veilnet::stdout::println(&out)
            };
            std::process::exit(if written.is_err() { 1 } else { code })
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(e.exit_code())
        }
    }
}

fn main() -> anyhow::Result<()> {
    let mut argv = std::env::args_os();
    if argv
        .next()
        .is_some_and(|a| veilnet::kubectl_plugin::invoked_as_plugin(&a))
    {
        kubectl_plugin(argv);
    }
    let cli = Cli::from_arg_matches(&cli_command().get_matches()).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::KubectlPlugin { args } => kubectl_plugin(args),
        Command::Completions { shell } => {
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
            };
            // Rendered first: clap_complete panics on a failed write (`… | head`).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cli_command(), "veilnet", &mut script);
            veilnet::stdout::print(&String::from_utf8_lossy(&script))?;
            Ok(())
        }
        // `veilnet lab up` is `veilnet-lab up`, shown as `veilnet lab` in its help and errors.
        Command::Lab { args } => hand_off("veilnet lab", &[], args, cli.log_format),
        Command::Bench { args } => hand_off("veilnet", &["bench"], args, cli.log_format),
        command => run(command, cli.log_format),
    }
}

fn run(command: Command, log_format: Option<LogFormat>) -> anyhow::Result<()> {
    // Daemons log what they do; one-shot commands report errors themselves and stay quiet.
    let default_level = match &command {
        Command::Agent(_) | Command::Datapath(_) => "info",
        _ => "warn,kube_client=off",
    };
    // The agent's config file may set the format too; the flag and the environment win.
    let format = log_format.or_else(|| match &command {
        Command::Agent(args) => args.file_log_format(),
        _ => None,
    });
    logging::init(format.unwrap_or_default(), default_level);
    match command {
        Command::Status(args) => veilnet::status_cmd::run(args),
        Command::Doctor(args) => std::process::exit(veilnet::doctor::run(args)?),
        Command::Audit(args) => match veilnet::audit::cli::run(args) {
            Ok((out, code)) => {
                let written = veilnet::stdout::println(&out);
                std::process::exit(if written.is_err() { 1 } else { code })
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(veilnet::audit::cli::EXIT_ERROR)
            }
        },
        Command::Observe(args) => match veilnet::observe::run(args) {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(veilnet::observe::EXIT_ERROR)
            }
        },
        Command::Policy(cmd) => {
            veilnet::stdout::println(&veilnet::policy::cli::run(cmd)?)?;
            Ok(())
        }
        Command::Datapath(args) => Ok(veilnet::datapath::run(args)?),
        Command::Agent(args) => {
            // Before the runtime's threads exist, so that none of them gets an arena of its own.
            veilnet::memory::limit_arenas(AGENT_MALLOC_ARENAS);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(agent::run(*args))
                .map_err(Into::into)
        }
        Command::Lab { .. }
        | Command::Bench { .. }
        | Command::Completions { .. }
        | Command::KubectlPlugin { .. } => unreachable!("handled in main"),
    }
}

/// Replaces this process with `veilnet-lab PREFIX… ARGS…`: the one beside this binary, else the
/// one on `PATH`. Being an exec, the exit code, signals and the process tree are the lab's own.
fn hand_off(
    shown_as: &str,
    prefix: &[&str],
    args: Vec<OsString>,
    log_format: Option<LogFormat>,
) -> anyhow::Result<()> {
    let beside = std::env::current_exe().map(|exe| exe.with_file_name(LAB_BINARY));
    let program = match &beside {
        Ok(path) if path.is_file() => path.clone(),
        // A bare name: exec looks it up on PATH.
        _ => PathBuf::from(LAB_BINARY),
    };
    let mut cmd = std::process::Command::new(&program);
    cmd.arg0(shown_as).args(prefix);
    if let Some(format) = log_format.and_then(|f| f.to_possible_value()) {
        cmd.args(["--log-format", format.get_name()]);
    }
    let err = cmd.args(args).exec();
    if err.kind() == std::io::ErrorKind::NotFound && program == Path::new(LAB_BINARY) {
        let beside = match beside {
            Ok(path) => path.display().to_string(),
            Err(e) => format!("beside this binary ({e})"),
        };
        bail!(
            "`{shown_as}{}` needs the {LAB_BINARY} binary, found neither at {beside} nor on PATH: \
             build it with `cargo build -p {LAB_BINARY}` (or `cargo build --workspace`)",
            prefix.iter().map(|p| format!(" {p}")).collect::<String>()
        );
    }
    bail!("failed to run {}: {err}", program.display())
}
