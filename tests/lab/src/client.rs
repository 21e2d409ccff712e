//! Talking to a lab's API from the root namespace: the API listens inside the control plane's
//! namespace, so the client runs on a thread that entered it, with its own small runtime.

use std::future::Future;
use std::path::{Path, PathBuf};

use kube::config::{KubeConfigOptions, Kubeconfig};

use super::layout::LabLayout;
use veilnet::netns::{self, NetnsError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("bad API URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig { path: PathBuf, reason: String },
    #[error("failed to build a runtime: {0}")]
    Runtime(std::io::Error),
}

/// A kube client for an API at `url` (plain HTTP in the lab).
pub fn client_for(url: &str) -> Result<kube::Client, ClientError> {
    let uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| ClientError::Url {
            url: url.into(),
            reason: e.to_string(),
        })?;
    let mut config = kube::Config::new(uri);
    config.default_namespace = "default".into();
    Ok(kube::Client::try_from(config)?)
}

/// A kube client from a kubeconfig file (the lab's admin one, a kubelet's, an agent's).
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, ClientError> {
    let err = |reason: String| ClientError::Kubeconfig {
        path: path.to_path_buf(),
        reason,
    };
    let kc = Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| err(e.to_string()))?;
    Ok(kube::Client::try_from(config)?)
}

/// Runs `f` with a client of the lab's API (as the lab's admin: its kubeconfig), inside the
/// control plane's namespace.
pub fn with_client<T, F, Fut>(lab: &LabLayout, f: F) -> Result<T, ClientError>
where
    T: Send + 'static,
    F: FnOnce(kube::Client) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    let kubeconfig = lab.kubeconfig();
    netns::run_in(&lab.control_plane_netns(), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        rt.block_on(async move {
            let client = client_from_kubeconfig(&kubeconfig).await?;
            Ok(f(client).await)
        })
    })?
}

/// The kubeconfig of a stand-in lab: one cluster, no credentials (the stand-in has no auth). A
/// lab on the real control plane has the admin's client certificate instead
/// (`control_plane::kubernetes::prepare`).
pub fn kubeconfig(lab: &LabLayout) -> serde_json::Value {
    let name = lab.name();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": lab.api_url()}}],
        "users": [{"name": format!("{name}-admin"), "user": {}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": format!("{name}-admin"), "namespace": "default"}}],
        "current-context": name,
    })
}
