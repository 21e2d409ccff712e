//! `veilnet datapath`: the long-lived process that owns the WireGuard device (TUN, UDP sockets,
//! sessions), apart from the agent.
//!
//! Why a process of its own: the agent is upgraded and restarted far more often than the datapath
//! must change, and while a userspace datapath is down no encrypted packet moves. With the device
//! here, an agent restart or rollout (pod gone for seconds) does not stall traffic at all: the
//! sessions, timers and counters live on. The agent stays the only writer of the configuration
//! and talks to us over `<run dir>/datapath.sock` ([`protocol`]). We save what we are told
//! (`datapath.state`, 0600) and restore it on start, so a restart of the datapath itself costs
//! only its own start-up and one handshake per peer, even while no agent runs.

pub mod client;
pub mod protocol;
mod server;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Mutex;

use protocol::{ProtocolError, Request, Response};
use server::Datapath;

/// The control socket in the run directory (shared with the agent through a hostPath).
pub const SOCKET_FILE: &str = "datapath.sock";
/// The saved configuration, next to it (tmpfs: a reboot starts clean and the agent configures).
pub const STATE_FILE: &str = "datapath.state";

pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join(SOCKET_FILE)
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("no device yet: the agent has not configured this datapath")]
    NotConfigured,
    #[error("private key: {0}")]
    Key(crate::wg::KeyError),
    #[error("WireGuard device: {0}")]
    Device(#[from] crate::wg::WgError),
    #[error("another datapath already serves {0}")]
    AlreadyRunning(PathBuf),
    #[error("control socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("signal handling: {0}")]
    Signal(std::io::Error),
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    #[error("probe: {0}")]
    Probe(String),
}

#[derive(Debug, clap::Args)]
pub struct DatapathArgs {
    /// Directory of the control socket and the saved configuration; the agent's `--run-dir`.
    #[arg(long, default_value = "/run/veilnet")]
    pub run_dir: PathBuf,
    /// Check a running datapath instead of starting one (the DaemonSet's liveness probe): exits
    /// 0 when it answers and its packet thread is turning, 1 otherwise, saying why.
    #[arg(long)]
    pub probe: bool,
}

/// A packet thread that has not gone round its loop for this long is stuck (it turns at least
/// every timer tick, a fraction of a second, even when idle).
pub const STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The probe's verdict on a datapath's answer (pure).
pub fn probe_verdict(info: &protocol::Info) -> Result<String, String> {
    if info.protocol != protocol::PROTOCOL {
        return Err(format!(
            "the datapath speaks control protocol {}, this binary {}",
            info.protocol,
            protocol::PROTOCOL
        ));
    }
    let Some(dev) = &info.device else {
        return Ok(format!(
            "datapath pid {} up, waiting for the agent to configure it",
            info.pid
        ));
    };
    let age = std::time::Duration::from_millis(dev.turn_age_ms);
    if age > STALL_LIMIT {
        return Err(format!(
            "the packet thread of pid {} has not turned for {:.1} s (stuck)",
            info.pid,
            age.as_secs_f64()
        ));
    }
    Ok(format!(
        "datapath pid {} up: {}, {} peers, packet thread turned {} ms ago",
        info.pid, dev.tun_name, dev.peers, dev.turn_age_ms
    ))
}

/// Runs until SIGTERM/SIGINT. The device's packets move on its own thread; this runtime only
/// serves the control socket, so one thread is enough.
pub fn run(args: DatapathArgs) -> Result<(), DatapathError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DatapathError::Runtime)?
        .block_on(async move {
            if args.probe {
                probe(&args.run_dir).await
            } else {
                serve(args).await
            }
        })
}

async fn probe(run_dir: &Path) -> Result<(), DatapathError> {
    let mut client = client::DatapathClient::new(&socket_path(run_dir));
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        client.call(&Request::Hello),
    )
    .await
    .map_err(|_| DatapathError::Probe("no answer within 3 s".into()))?
    .map_err(|e| DatapathError::Probe(e.to_string()))?;
    let message = probe_verdict(&answer.info).map_err(DatapathError::Probe)?;
    println!("{message}");
    Ok(())
}

/// Connections the control socket holds at once.
const CONTROL_MAX_CONNECTIONS: usize = 16;

async fn serve(args: DatapathArgs) -> Result<(), DatapathError> {
    match crate::listen::raise_fd_limit() {
        Ok((soft, _)) => tracing::debug!(limit = soft, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
    }
    let socket = socket_path(&args.run_dir);
    let sock_err = |source| DatapathError::Socket {
        path: socket.clone(),
        source,
    };
    std::fs::create_dir_all(&args.run_dir).map_err(sock_err)?;
    let listener = bind_exclusive(&socket).await?;
    let our_socket = std::fs::metadata(&socket).map(|m| m.ino()).ok();
    let datapath = Arc::new(Mutex::new(Datapath::new(args.run_dir.join(STATE_FILE))));
    datapath.lock().await.restore().await;
    let info = datapath.lock().await.info();
    tracing::info!(socket = %socket.display(), pid = info.pid, instance = %info.instance, configured = info.device.is_some(), "datapath serving");

    let mut sigterm = signal(SignalKind::terminate()).map_err(DatapathError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DatapathError::Signal)?;
    // The socket is root-only (0600) and its clients are the agent (two during a rollout) and
    // liveness probes; the cap keeps the descriptors of the datapath's own work (TUN, UDP
    // sockets) safe whatever connects (`crate::listen`).
    let cap = crate::listen::ConnLimit::new("datapath", CONTROL_MAX_CONNECTIONS);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if let Some(permit) = cap.try_admit() {
                        let datapath = datapath.clone();
                        tokio::spawn(async move {
                            let _permit = permit;
                            serve_connection(stream, datapath).await;
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    // Only remove the socket if it is still ours (a successor may have replaced it).
    if std::fs::metadata(&socket).map(|m| m.ino()).ok() == our_socket {
        let _ = std::fs::remove_file(&socket);
    }
    datapath.lock().await.shutdown().await;
    tracing::info!("datapath stopped; the TUN stays for the next start");
    Ok(())
}

/// Binds the control socket, 0600. A socket file nobody answers on is a leftover and is
/// replaced; one that answers belongs to a running datapath, and two must never fight over
/// one TUN.
async fn bind_exclusive(socket: &Path) -> Result<UnixListener, DatapathError> {
    let sock_err = |source| DatapathError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    if UnixStream::connect(socket).await.is_ok() {
        return Err(DatapathError::AlreadyRunning(socket.to_path_buf()));
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
    }
    let listener = UnixListener::bind(socket).map_err(sock_err)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(sock_err)?;
    Ok(listener)
}

/// One client (normally the agent, two during a rollout): requests in order, one response each.
async fn serve_connection(stream: UnixStream, datapath: Arc<Mutex<Datapath>>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let outcome = match protocol::read_message::<Request, _>(&mut reader).await {
            Ok(req) => datapath.lock().await.handle(req).await,
            Err(ProtocolError::Closed) => return,
            Err(ProtocolError::Malformed(e)) => {
                protocol::Outcome::Error(format!("malformed request: {e}"))
            }
            Err(e) => {
                // Too long or I/O: the stream is out of step; answer once and hang up.
                tracing::warn!(error = %e, "dropping a control connection");
                let resp = Response {
                    info: datapath.lock().await.info(),
                    outcome: protocol::Outcome::Error(e.to_string()),
                };
                if let Ok(line) = protocol::encode(&resp) {
                    let _ = write.write_all(&line).await;
                }
                return;
            }
        };
        let resp = Response {
            info: datapath.lock().await.info(),
            outcome,
        };
        let line = match protocol::encode(&resp) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a response");
                return;
            }
        };
        if write.write_all(&line).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::protocol::{DeviceInfo, Info, PROTOCOL};
    use super::*;

    fn info(device: Option<u64>) -> Info {
        Info {
            protocol: PROTOCOL,
            version: "0.1.0".into(),
            instance: "i".into(),
            pid: 42,
            started_at: 0,
            device: device.map(|age| DeviceInfo {
                tun_name: "veilwg0".into(),
                listen_port: 51820,
                mtu: 1440,
                public_key: String::new(),
                peers: 2,
                offloads: String::new(),
                turn_age_ms: age,
            }),
        }
    }

    #[test]
    fn the_probe_fails_only_on_a_stuck_packet_thread_or_a_foreign_protocol() {
        assert!(probe_verdict(&info(None))
            .unwrap()
            .contains("waiting for the agent"));
        assert!(probe_verdict(&info(Some(240))).unwrap().contains("2 peers"));
        let limit = STALL_LIMIT.as_millis() as u64;
        assert!(probe_verdict(&info(Some(limit))).is_ok());
        let stuck = probe_verdict(&info(Some(limit + 1))).unwrap_err();
        assert!(
            stuck.contains("stuck") && stuck.contains("pid 42"),
            "{stuck}"
        );
        let mut other = info(None);
        other.protocol = PROTOCOL + 1;
        assert!(probe_verdict(&other).is_err());
    }
}
