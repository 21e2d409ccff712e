//! The lab kubelet. (Being written; see issue 2.)

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
}

/// `veilnet lab kubelet`: run pods of one node (started by `veilnet lab up`).
#[derive(Clone, Debug, clap::Args)]
pub struct KubeletArgs {
    /// Name of the Node this kubelet runs.
    #[arg(long)]
    pub node_name: String,
}

pub async fn run(args: KubeletArgs) -> Result<(), KubeletError> {
    let _ = args;
    Ok(())
}
