//! The pod's network namespace, as the runtime names it in `CNI_NETNS` (a path).
//!
//! We never move the main thread: a short-lived thread joins the pod namespace, opens a netlink
//! socket there and exits. The socket stays bound to the pod namespace (the kernel ties a socket
//! to the namespace it was created in), so every later request through it configures the pod.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

use crate::netlink::{Netlink, NetlinkError};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("network namespace {path} does not exist")]
    NotFound { path: PathBuf },
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("netlink in network namespace {path}: {source}")]
    Netlink { path: PathBuf, source: NetlinkError },
    #[error("thread entering network namespace {path} failed: {reason}")]
    Thread { path: PathBuf, reason: String },
}

/// An open handle on a pod's network namespace.
pub struct PodNetns {
    path: PathBuf,
    file: File,
}

impl PodNetns {
    pub fn open(path: &Path) -> Result<PodNetns, SandboxError> {
        let file = File::open(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                SandboxError::NotFound {
                    path: path.to_path_buf(),
                }
            } else {
                SandboxError::Open {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        Ok(PodNetns {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// For `IFLA_NET_NS_FD`: valid as long as `self` lives.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// A netlink socket inside this namespace.
    pub fn netlink(&self) -> Result<Netlink, SandboxError> {
        let path = self.path.clone();
        self.run_in(move || {
            Netlink::open().map_err(|source| SandboxError::Netlink {
                path: path.clone(),
                source,
            })
        })?
    }

    /// Runs `f` on a thread inside this namespace (a child process it spawns starts there too:
    /// a new process takes the calling thread's namespaces).
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, SandboxError> {
        let path = &self.path;
        std::thread::scope(|scope| {
            let worker = std::thread::Builder::new()
                .name("veilnet-cni-netns".into())
                .spawn_scoped(scope, || {
                    setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|source| {
                        SandboxError::Enter {
                            path: path.clone(),
                            source,
                        }
                    })?;
                    Ok(f())
                })
                .map_err(|e| SandboxError::Thread {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            worker.join().unwrap_or_else(|_| {
                Err(SandboxError::Thread {
                    path: path.clone(),
                    reason: "panicked".into(),
                })
            })
        })
    }
}
