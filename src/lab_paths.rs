//! Where a lab (the `veilnet-lab` test bed, `veilnet lab …`) keeps its files, as a convention.
//!
//! `veilnet status --lab` and `veilnet policy explain --lab` read a lab's node run directory and
//! kubeconfig by this convention, without any lab code; the lab crate lays its files out with it.
//! Every path is derived from the lab's name; nothing here touches the disk.

use std::path::{Path, PathBuf};

/// Base directory of every lab's files; one sub-directory per lab.
pub const DEFAULT_LAB_ROOT: &str = "/var/lib/veilnet-lab";
/// Overrides [`DEFAULT_LAB_ROOT`].
pub const LAB_ROOT_ENV: &str = "VEILNET_LAB_ROOT";
/// A node's runtime directory inside its node directory: the agent's `--run-dir` in a lab.
pub const NODE_RUN_DIR: &str = "run";
/// A node's persistent state directory inside its node directory: the agent's `--state-dir`.
pub const NODE_STATE_DIR: &str = "state";
/// A node's CNI configuration directory inside its node directory.
pub const NODE_CNI_CONF_DIR: &str = "cni/net.d";

#[derive(Debug, thiserror::Error)]
#[error("invalid lab name {0:?}: use 1-24 characters of a-z, 0-9 and '-', starting with a letter")]
pub struct InvalidLabName(pub String);

/// Lab names are short DNS labels without dots, so the namespace prefix `<lab>.` belongs to one lab.
pub fn validate_name(name: &str) -> Result<(), InvalidLabName> {
    let ok = (1..=24).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(InvalidLabName(name.to_string()))
    }
}

/// Root directory for all labs: `$VEILNET_LAB_ROOT`, else [`DEFAULT_LAB_ROOT`].
pub fn labs_root() -> PathBuf {
    std::env::var_os(LAB_ROOT_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_LAB_ROOT))
}

/// The paths of one lab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabPaths {
    name: String,
    root: PathBuf,
}

impl LabPaths {
    pub fn new(name: &str) -> Result<Self, InvalidLabName> {
        validate_name(name)?;
        Ok(Self {
            name: name.to_string(),
            root: labs_root().join(name),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    /// The lab's own directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// A kubeconfig for the lab's API (reachable from the control plane's namespace).
    pub fn kubeconfig(&self) -> PathBuf {
        self.root.join("kubeconfig")
    }
    /// The network namespace of the control plane, where the lab's API listens.
    pub fn control_plane_netns(&self) -> String {
        format!("{}.cp", self.name)
    }
    /// One node's directory, e.g. for `node-1`.
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.root.join("nodes").join(node)
    }
    /// One node's runtime directory (the agent's status files, sockets).
    pub fn node_run_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join(NODE_RUN_DIR)
    }
    /// One node's persistent state (its WireGuard key, IPAM): the agent's `--state-dir`.
    pub fn node_state_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join(NODE_STATE_DIR)
    }
    /// The CNI configuration directory of one node: the agent's and kubelet's `--cni-conf-dir`.
    pub fn node_cni_conf_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join(NODE_CNI_CONF_DIR)
    }
    /// The network namespace of a node named `node-N` (`<lab>.nN`); `None` for other names.
    pub fn node_netns(&self, node: &str) -> Option<String> {
        let index: usize = node.strip_prefix("node-")?.parse().ok()?;
        (index > 0 && !node.contains('+')).then(|| format!("{}.n{index}", self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["veilnet", "a", "lab-2", "x23456789012345678901234"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Lab", "2lab", "a.b", "a_b", "x234567890123456789012345"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn paths_follow_the_name() {
        let lab = LabPaths::new("demo").unwrap();
        assert!(lab.root().ends_with("demo"));
        assert_eq!(lab.kubeconfig(), lab.root().join("kubeconfig"));
        assert_eq!(
            lab.node_run_dir("node-2"),
            lab.root().join("nodes/node-2/run")
        );
        assert_eq!(lab.control_plane_netns(), "demo.cp");
        assert_eq!(lab.node_netns("node-3").as_deref(), Some("demo.n3"));
        for bad in ["node-0", "node-", "node-x", "n1", "node-+1"] {
            assert_eq!(lab.node_netns(bad), None, "{bad}");
        }
        assert_eq!(
            lab.node_state_dir("node-1"),
            lab.root().join("nodes/node-1/state")
        );
    }
}
