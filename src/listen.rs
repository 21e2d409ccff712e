//! Keeping the agent's and the datapath's own work supplied with file descriptors, whatever their
//! clients do (issue 23.3).
//!
//! - [`raise_fd_limit`]: at start the soft `RLIMIT_NOFILE` goes up to the hard limit.
//! - [`ConnLimit`]: every listener (the health and metrics HTTP endpoints, the CNI admission
//!   socket, the datapath's control socket) admits at most a fixed number of connections at once,
//!   each holding a permit until it closes; a connection over the cap is closed at once and
//!   counted (`veilnet_connections_rejected_total{listener}`). The caps add up to a few hundred,
//!   far below the limit, so nft scripts, netlink sockets and state files always find a
//!   descriptor.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns `(soft, hard)` as they are now.
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        // Raising the soft limit up to the hard one needs no privilege.
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft.max(hard), hard))
}

/// A cap on the connections one listener holds open at once.
#[derive(Debug)]
pub struct ConnLimit {
    name: &'static str,
    max: usize,
    permits: Arc<Semaphore>,
    rejected: AtomicU64,
    refused: AtomicU64,
}

impl ConnLimit {
    pub fn new(name: &'static str, max: usize) -> Arc<ConnLimit> {
        Arc::new(ConnLimit {
            name,
            max,
            permits: Arc::new(Semaphore::new(max)),
            rejected: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// A permit for one more connection (hold it until the connection is closed), or `None`
    /// when the cap is reached: the caller closes the connection at once.
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                let n = self.rejected.fetch_add(1, Ordering::Relaxed) + 1;
                // 1, 2, 4, 8 …: an attack is visible in the log without flooding it.
                if n.is_power_of_two() {
                    tracing::warn!(
                        listener = self.name,
                        max = self.max,
                        rejected = n,
                        "connection cap reached; closing new connections at once"
                    );
                }
                None
            }
        }
    }

    /// Counts a connection closed at once because its source may not use this listener (the
    /// flows endpoint refuses pods), and logs the 1st, 2nd, 4th … with the source.
    pub fn refuse(&self, source: std::net::IpAddr) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(
                listener = self.name,
                %source,
                refused = n,
                "connection refused: this source may not use the listener"
            );
        }
    }

    /// Connections closed at once because of their source, since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
    pub fn max(&self) -> usize {
        self.max
    }
    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }
    /// Connections closed at once because the cap was reached, since start.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_admits_up_to_max_and_counts_the_rest() {
        let l = ConnLimit::new("t", 2);
        let a = l.try_admit().unwrap();
        let _b = l.try_admit().unwrap();
        assert!(l.try_admit().is_none());
        assert_eq!((l.open(), l.rejected()), (2, 1));
        drop(a);
        assert!(l.try_admit().is_some());
        assert_eq!(l.rejected(), 1);
    }

    #[test]
    fn the_soft_fd_limit_reaches_the_hard_one() {
        let (soft, hard) = raise_fd_limit().unwrap();
        assert_eq!(soft, hard);
    }
}
