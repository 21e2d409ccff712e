//! The pod network as the runtime sees it: the node reports it (`node`), the pod workers wait for
//! it before they attach sandboxes (`pods`).

use std::sync::Arc;

use super::cni::NetworkConfigList;

/// The network as the runtime sees it.
#[derive(Clone, Debug, Default)]
pub struct NetworkState {
    pub ready: bool,
    /// The config list new sandboxes are attached with.
    pub config: Option<Arc<NetworkConfigList>>,
    /// Why the network is not ready.
    pub message: String,
}

/// The Ready condition message for a network that is not ready, as the kubelet words it.
pub fn not_ready_message(detail: &str) -> String {
    format!(
        "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:Network plugin returns error: {detail}"
    )
}
