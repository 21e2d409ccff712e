//! `veilnet lab …` commands. (Being written.)

use super::{apiserver, kubelet};

#[derive(Debug, clap::Subcommand)]
pub enum LabCommand {
    /// Serve the Kubernetes API stand-in (started by `lab up`).
    #[command(hide = true)]
    Apiserver(apiserver::ApiServerArgs),
    /// Run the lab kubelet of one node (started by `lab up`).
    #[command(hide = true)]
    Kubelet(kubelet::KubeletArgs),
}

pub fn run(cmd: LabCommand) -> anyhow::Result<()> {
    match cmd {
        LabCommand::Apiserver(args) => block_on(async { Ok(apiserver::run(args).await?) }),
        LabCommand::Kubelet(args) => block_on(async { Ok(kubelet::run(args).await?) }),
    }
}

fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(f)
}
