//! Publishing what peers need to know about this node (VTEP MAC, underlay address, WireGuard key …)
//! as Node annotations.
//!
//! Written with a JSON merge patch of the `nodes/status` subresource, as Flannel does, so the agent's
//! RBAC needs `nodes/status: patch` and nothing broader. Only our own keys are ever touched: a key
//! set to `None` is removed, every other annotation is left alone.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::Api;

/// The agent's field manager name on every write.
pub const FIELD_MANAGER: &str = "veilnet-agent";

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("patching annotations of node {node}: {source}")]
    Patch { node: String, source: kube::Error },
}

/// What to change: `Some(value)` sets a key, `None` removes it.
pub type AnnotationChanges = BTreeMap<String, Option<String>>;

/// The changes needed to go from `current` to `desired` for the keys in `owned`. Pure, so the agent
/// skips the API call when nothing changed (no write per resync).
pub fn diff(
    current: Option<&BTreeMap<String, String>>,
    desired: &BTreeMap<String, String>,
    owned: &[&str],
) -> AnnotationChanges {
    let mut changes = AnnotationChanges::new();
    for key in owned {
        let have = current.and_then(|c| c.get(*key));
        match (have, desired.get(*key)) {
            (Some(h), Some(d)) if h == d => {}
            (_, Some(d)) => {
                changes.insert(key.to_string(), Some(d.clone()));
            }
            (Some(_), None) => {
                changes.insert(key.to_string(), None);
            }
            (None, None) => {}
        }
    }
    changes
}

/// Applies `changes` to the node's annotations (merge patch on `nodes/status`).
pub async fn publish(
    client: kube::Client,
    node: &str,
    changes: &AnnotationChanges,
) -> Result<(), PublishError> {
    if changes.is_empty() {
        return Ok(());
    }
    let patch = serde_json::json!({ "metadata": { "annotations": changes } });
    Api::<Node>::all(client)
        .patch_status(
            node,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(|source| PublishError::Patch {
            node: node.to_string(),
            source,
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_owned_keys_that_differ_are_patched() {
        let current = map(&[
            ("veilnet.io/a", "1"),
            ("veilnet.io/b", "old"),
            ("other", "x"),
            ("veilnet.io/gone", "y"),
        ]);
        let desired = map(&[
            ("veilnet.io/a", "1"),
            ("veilnet.io/b", "new"),
            ("veilnet.io/c", "3"),
            ("other", "ignored"),
        ]);
        let owned = [
            "veilnet.io/a",
            "veilnet.io/b",
            "veilnet.io/c",
            "veilnet.io/gone",
        ];
        let changes = diff(Some(&current), &desired, &owned);
        assert_eq!(
            changes,
            BTreeMap::from([
                ("veilnet.io/b".to_string(), Some("new".to_string())),
                ("veilnet.io/c".to_string(), Some("3".to_string())),
                ("veilnet.io/gone".to_string(), None),
            ])
        );
        assert!(diff(Some(&desired), &desired, &["veilnet.io/a"]).is_empty());
    }
}
