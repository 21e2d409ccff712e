//! The lab's Kubernetes API stand-in. (Being written; see issue 2.)

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("failed to listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// `veilnet lab apiserver`: serve the API stand-in (started by `veilnet lab up`).
#[derive(Clone, Debug, clap::Args)]
pub struct ApiServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    pub listen: SocketAddr,
}

pub async fn run(args: ApiServerArgs) -> Result<(), ApiServerError> {
    let _ = args;
    Ok(())
}
