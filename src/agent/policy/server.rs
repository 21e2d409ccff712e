//! The admission socket: one JSON line in (`admit`), one JSON line out (`admitted` once an
//! applied ruleset holds the pod, else `refused` with the reason). See
//! `veilnet_cni::agent_protocol` for the design.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use veilnet_cni::agent_protocol::{
    decode_line, encode_line, PodAttachment, Request, Response, MAX_LINE, PROTOCOL_VERSION,
    SOCKET_FILE,
};

use super::{lock, PolicyAgentError, Shared};

/// Binds `<runDir>/agent.sock` (replacing a stale socket of an earlier agent), root only.
pub fn bind(run_dir: &Path) -> Result<UnixListener, PolicyAgentError> {
    let path = run_dir.join(SOCKET_FILE);
    let err = |source| PolicyAgentError::Socket {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(run_dir).map_err(err)?;
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let listener = UnixListener::bind(&path).map_err(err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Time a client has to send its request line.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Time the answer may take to write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Accepts connections forever; each is served on its own task, at most `cap` at once (one more
/// is closed at once, see `crate::listen`). A connection lives at most [`READ_TIMEOUT`] + the
/// admission budget + [`WRITE_TIMEOUT`].
pub async fn serve(
    listener: UnixListener,
    shared: Arc<Shared>,
    client_timeout: Duration,
    cap: Arc<crate::listen::ConnLimit>,
) {
    // Answer a little before the plugin gives up, so it gets the reason instead of a timeout.
    let budget = client_timeout.saturating_sub(Duration::from_millis(500));
    let mut failures: u64 = 0;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Some(permit) = cap.try_admit() else {
                    drop(stream);
                    continue;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    serve_one(stream, shared, budget).await;
                });
            }
            Err(e) => {
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!(error = %e, failures, "admission socket accept failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_one(stream: UnixStream, shared: Arc<Shared>, budget: Duration) {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(MAX_LINE as u64 + 1);
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line));
    let response = match read.await {
        Ok(Ok(n)) if n > 0 => match decode_line::<Request>(&line) {
            Ok(Request::Admit {
                version,
                attachment,
            }) if version == PROTOCOL_VERSION => admit(&shared, attachment, budget).await,
            Ok(Request::Admit { version, .. }) => Response::Refused {
                reason: format!("protocol version {version}, the agent speaks {PROTOCOL_VERSION}"),
            },
            Err(e) => Response::Refused {
                reason: e.to_string(),
            },
        },
        _ => return, // the client went away or sent nothing
    };
    if let Response::Refused { reason } = &response {
        tracing::warn!(reason = %reason, "pod admission refused");
    }
    let _ = tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&encode_line(&response))).await;
}

/// Records the attachment, triggers a sync and waits until an applied generation guards every
/// IP of the pod's port.
pub async fn admit(shared: &Arc<Shared>, a: PodAttachment, budget: Duration) -> Response {
    let pod = format!("{}/{}", a.namespace, a.name);
    if let Err(e) = lock(&shared.attachments).insert(a.clone()) {
        return Response::Refused {
            reason: e.to_string(),
        };
    }
    tracing::info!(pod = %pod, veth = %a.host_veth, ips = ?a.ips, "pod admission requested");
    shared.wake.notify_one();
    let want: Vec<(String, std::net::IpAddr)> =
        a.ips.iter().map(|ip| (a.host_veth.clone(), *ip)).collect();
    let mut applied = shared.applied.subscribe();
    let deadline = tokio::time::Instant::now() + budget;
    loop {
        let programmed = {
            let now = applied.borrow_and_update();
            want.iter()
                .all(|k| now.ports.contains(k))
                .then_some(now.generation)
        };
        if let Some(generation) = programmed {
            forget_flows_of(&pod, a.ips.clone()).await;
            return Response::Admitted { generation };
        }
        tokio::select! {
            changed = applied.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    // Not programmed in time: forget it (the plugin rolls the veth back) and say why.
    lock(&shared.attachments).remove(&a.container_id, &a.ifname);
    shared.wake.notify_one();
    Response::Refused {
        reason: refusal_reason(shared, &a),
    }
}

/// Deletes the conntrack entries of a newly admitted pod's addresses before its link comes up
/// (`crate::policy::conntrack::forget_addresses`): none of them can be the pod's own, and one
/// that predates its chains would let packets past its policy as `established`. Best effort: a
/// failure is logged, and the ruleset's drop of unadmitted addresses still held until now.
async fn forget_flows_of(pod: &str, ips: Vec<std::net::IpAddr>) {
    let result = tokio::task::spawn_blocking(move || {
        crate::netfilter::conntrack::ConntrackSocket::open(super::CONNTRACK_TIMEOUT)
            .and_then(|mut s| crate::policy::conntrack::forget_addresses(&mut s, &ips))
    })
    .await;
    match result {
        Ok(Ok(r)) if r.denied > 0 => tracing::info!(
            pod,
            forgotten = r.cut,
            failed = r.failed,
            "flows recorded for a new pod's address before it was admitted forgotten"
        ),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(pod, error = %e, "cannot clear a new pod's conntrack entries"),
        Err(e) => tracing::warn!(pod, error = %e, "conntrack task failed"),
    }
}

fn refusal_reason(shared: &Shared, a: &PodAttachment) -> String {
    let pod = format!("{}/{}", a.namespace, a.name);
    let found = shared.pods.state().into_iter().find(|p| {
        p.metadata.namespace.as_deref() == Some(a.namespace.as_str())
            && p.metadata.name.as_deref() == Some(a.name.as_str())
    });
    match found {
        None => format!("pod {pod} is not (yet) in the agent's view of the API"),
        Some(p) => {
            let node = p.spec.as_ref().and_then(|s| s.node_name.as_deref());
            if node != Some(shared.options.node.as_str()) {
                format!(
                    "pod {pod} is bound to node {:?}, this is {}",
                    node.unwrap_or(""),
                    shared.options.node
                )
            } else if let Some(e) = shared.status.borrow().last_error.clone() {
                format!("the ruleset for pod {pod} could not be applied: {e}")
            } else {
                format!("pod {pod} was not programmed in time")
            }
        }
    }
}
