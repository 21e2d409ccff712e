//! The pod admission handshake between the plugin's ADD and the node's agent, so that a new pod
//! never sends or receives a packet before its NetworkPolicy state is in the kernel.
//!
//! # Design
//!
//! The agent, when it enforces policy, writes `<runDir>/policy-admission.json` ([`AdmissionConfig`])
//! *before* it ever marks the node ready, and listens on the unix socket named there (by default
//! `<runDir>/agent.sock`). In agent mode, ADD reads that file; when it is present, ADD:
//! 1. creates the veth with its host end **down** (so the pod end has no carrier: nothing can be
//!    sent or received, ARP included), configures address and routes inside the pod;
//! 2. sends one [`Request::Admit`] line with the pod's identity (from `CNI_ARGS`), IP, MAC and host
//!    veth, and waits (bounded by the config's timeout) for one [`Response`] line;
//! 3. brings the host end up only after [`Response::Admitted`]: the agent answers that only once
//!    the applied nft ruleset holds the pod's anti-spoofing port and, where it is isolated, its
//!    chains.
//!
//! Any failure (no socket, no answer in time, a refusal) fails the ADD with error 11 ("try again
//! later"), and the rollback guards remove the veth and the address: fail closed. The agent uses
//! the plugin's facts directly, so it does not have to wait for the pod's IP to reach the API.
//!
//! The wire format is one JSON object per line (`\n`-terminated), one request and one response per
//! connection. Lines are capped at [`MAX_LINE`] bytes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The admission config file under `runDir`.
pub const ADMISSION_FILE: &str = "policy-admission.json";
/// The socket's default file name under `runDir`.
pub const SOCKET_FILE: &str = "agent.sock";
/// Version of both the config file and the wire messages.
pub const PROTOCOL_VERSION: u32 = 1;
/// How long ADD waits for the agent unless the config says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest accepted line, either way.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("policy admission config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("cannot reach the veilnet agent at {socket}: {source}")]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the veilnet agent at {socket}: {source}")]
    Io {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("the veilnet agent at {socket} did not confirm the pod's policy within {timeout:?}")]
    Timeout { socket: PathBuf, timeout: Duration },
    #[error("the veilnet agent refused the pod: {reason}")]
    Refused { reason: String },
    #[error("malformed message: {detail}")]
    Malformed { detail: String },
    #[error("policy enforcement needs K8S_POD_NAMESPACE and K8S_POD_NAME in CNI_ARGS")]
    NoPodIdentity,
}

/// `<runDir>/policy-admission.json`: present iff ADD must be admitted by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionConfig {
    pub version: u32,
    /// The agent's socket.
    pub socket: PathBuf,
    /// How long ADD waits for the answer.
    pub timeout_ms: u64,
}

impl AdmissionConfig {
    pub fn path_in(run_dir: &Path) -> PathBuf {
        run_dir.join(ADMISSION_FILE)
    }

    pub fn new(run_dir: &Path) -> AdmissionConfig {
        AdmissionConfig {
            version: PROTOCOL_VERSION,
            socket: run_dir.join(SOCKET_FILE),
            timeout_ms: DEFAULT_TIMEOUT.as_millis() as u64,
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.clamp(100, 60_000))
    }

    /// `Ok(None)` when the file does not exist (the agent does not enforce policy).
    pub fn load(run_dir: &Path) -> Result<Option<AdmissionConfig>, AdmissionError> {
        let path = Self::path_in(run_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(AdmissionError::Config {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        let config: AdmissionConfig =
            serde_json::from_slice(&bytes).map_err(|e| AdmissionError::Config {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if config.version != PROTOCOL_VERSION {
            return Err(AdmissionError::Config {
                path,
                reason: format!(
                    "version {} (this plugin speaks {PROTOCOL_VERSION})",
                    config.version
                ),
            });
        }
        Ok(Some(config))
    }

    /// Writes the file atomically (exclusive temp file + rename, see `fsutil`), creating `run_dir`.
    pub fn write(&self, run_dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(run_dir)?;
        let path = Self::path_in(run_dir);
        let body = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::fsutil::write_atomic(&path, &body, crate::fsutil::WriteOptions::STATE)
    }

    /// Removes the file (absent is fine): ADD stops asking the agent.
    pub fn remove(run_dir: &Path) -> std::io::Result<()> {
        match std::fs::remove_file(Self::path_in(run_dir)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// What ADD tells the agent about the new attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodAttachment {
    pub container_id: String,
    pub ifname: String,
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID`, when the runtime passes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    pub ips: Vec<IpAddr>,
    /// The pod interface's MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The host end of the veth (the bridge port).
    pub host_veth: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Request {
    /// Program the pod's policy state and answer once it is in the kernel.
    Admit {
        version: u32,
        attachment: PodAttachment,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Response {
    /// The applied ruleset (generation `generation`) holds the pod.
    Admitted {
        generation: u64,
    },
    Refused {
        reason: String,
    },
}

/// One message as a line.
pub fn encode_line<T: Serialize>(message: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Parses one line (with or without its `\n`).
pub fn decode_line<T: DeserializeOwned>(line: &[u8]) -> Result<T, AdmissionError> {
    if line.len() > MAX_LINE {
        return Err(AdmissionError::Malformed {
            detail: format!("line of {} bytes exceeds {MAX_LINE}", line.len()),
        });
    }
    let trimmed = line.strip_suffix(b"\n").unwrap_or(line);
    serde_json::from_slice(trimmed).map_err(|e| AdmissionError::Malformed {
        detail: e.to_string(),
    })
}

/// Reads one `\n`-terminated line of at most [`MAX_LINE`] bytes.
pub fn read_line(reader: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let n = reader
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line)
}

/// Asks the agent at `socket` to admit `attachment`; returns the ruleset generation that holds it.
/// Blocks at most `timeout` in all.
pub fn admit(
    socket: &Path,
    attachment: &PodAttachment,
    timeout: Duration,
) -> Result<u64, AdmissionError> {
    let start = Instant::now();
    let stream = UnixStream::connect(socket).map_err(|source| AdmissionError::Connect {
        socket: socket.to_path_buf(),
        source,
    })?;
    let io = |source: std::io::Error| {
        if matches!(
            source.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            AdmissionError::Timeout {
                socket: socket.to_path_buf(),
                timeout,
            }
        } else {
            AdmissionError::Io {
                socket: socket.to_path_buf(),
                source,
            }
        }
    };
    let remaining = timeout
        .checked_sub(start.elapsed())
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_millis(1));
    stream.set_write_timeout(Some(remaining)).map_err(io)?;
    stream.set_read_timeout(Some(remaining)).map_err(io)?;
    let request = Request::Admit {
        version: PROTOCOL_VERSION,
        attachment: attachment.clone(),
    };
    (&stream).write_all(&encode_line(&request)).map_err(io)?;
    let line = read_line(&mut BufReader::new(&stream)).map_err(io)?;
    match decode_line::<Response>(&line)? {
        Response::Admitted { generation } => Ok(generation),
        Response::Refused { reason } => Err(AdmissionError::Refused { reason }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment() -> PodAttachment {
        PodAttachment {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            namespace: "x".into(),
            name: "a".into(),
            uid: Some("u-1".into()),
            ips: vec!["10.244.1.5".parse().unwrap()],
            mac: "0a:58:0a:f4:01:05".into(),
            host_veth: "veil0123456789a".into(),
        }
    }

    #[test]
    fn messages_round_trip_as_lines() {
        let req = Request::Admit {
            version: PROTOCOL_VERSION,
            attachment: attachment(),
        };
        let line = encode_line(&req);
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let text = String::from_utf8(line.clone()).unwrap();
        assert!(text.starts_with(r#"{"type":"admit","version":1,"attachment":{"containerId":"c1""#));
        assert!(text.contains(r#""hostVeth":"veil0123456789a""#));
        assert_eq!(decode_line::<Request>(&line).unwrap(), req);

        let ok = Response::Admitted { generation: 7 };
        assert_eq!(
            String::from_utf8(encode_line(&ok)).unwrap(),
            "{\"type\":\"admitted\",\"generation\":7}\n"
        );
        let no = Response::Refused {
            reason: "pod x/a is not in the API".into(),
        };
        assert_eq!(decode_line::<Response>(&encode_line(&no)).unwrap(), no);
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for bad in [
            &b""[..],
            b"{",
            b"{\"type\":\"admit\"}",
            b"{\"type\":\"nope\"}",
            b"\xff\xfe",
            b"[1,2,3]\n",
        ] {
            assert!(matches!(
                decode_line::<Request>(bad),
                Err(AdmissionError::Malformed { .. })
            ));
        }
        let huge = vec![b' '; MAX_LINE + 1];
        assert!(decode_line::<Response>(&huge).is_err());
    }

    #[test]
    fn read_line_is_bounded() {
        let long = vec![b'a'; MAX_LINE * 2];
        let line = read_line(&mut &long[..]).unwrap();
        assert_eq!(line.len(), MAX_LINE + 1);
        assert!(read_line(&mut &b""[..]).is_err());
        assert_eq!(read_line(&mut &b"ab\ncd"[..]).unwrap(), b"ab\n");
    }

    #[test]
    fn config_file_presence_decides() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(AdmissionConfig::load(dir.path()).unwrap(), None);
        let config = AdmissionConfig::new(dir.path());
        config.write(dir.path()).unwrap();
        let loaded = AdmissionConfig::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded, config);
        assert_eq!(loaded.socket, dir.path().join(SOCKET_FILE));
        assert_eq!(loaded.timeout(), DEFAULT_TIMEOUT);
        std::fs::write(
            AdmissionConfig::path_in(dir.path()),
            r#"{"version": 9, "socket": "/s", "timeoutMs": 1}"#,
        )
        .unwrap();
        assert!(AdmissionConfig::load(dir.path()).is_err());
        std::fs::write(AdmissionConfig::path_in(dir.path()), "nope").unwrap();
        assert!(AdmissionConfig::load(dir.path()).is_err());
        AdmissionConfig::remove(dir.path()).unwrap();
        AdmissionConfig::remove(dir.path()).unwrap();
        assert_eq!(AdmissionConfig::load(dir.path()).unwrap(), None);
    }

    /// A socket nobody listens on: ADD must fail (closed), naming the socket.
    #[test]
    fn unreachable_agent_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join(SOCKET_FILE);
        let err = admit(&socket, &attachment(), Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, AdmissionError::Connect { .. }), "{err}");
        assert!(err.to_string().contains("agent.sock"));
    }

    /// The client against an in-process server on a socket in a temp directory (no network).
    #[test]
    fn admit_against_a_server() {
        use std::os::unix::net::UnixListener;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join(SOCKET_FILE);
        let listener = UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let mut answers = vec![
                Response::Admitted { generation: 3 },
                Response::Refused {
                    reason: "no such pod".into(),
                },
            ]
            .into_iter();
            let mut seen = Vec::new();
            for _ in 0..3 {
                let (stream, _) = listener.accept().unwrap();
                let line = read_line(&mut BufReader::new(&stream)).unwrap();
                seen.push(decode_line::<Request>(&line).unwrap());
                // The third connection gets no answer: the client must time out.
                if let Some(answer) = answers.next() {
                    (&stream).write_all(&encode_line(&answer)).unwrap();
                } else {
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
            seen
        });
        let a = attachment();
        assert_eq!(admit(&socket, &a, Duration::from_secs(2)).unwrap(), 3);
        let refused = admit(&socket, &a, Duration::from_secs(2)).unwrap_err();
        assert!(refused.to_string().contains("no such pod"), "{refused}");
        let timed_out = admit(&socket, &a, Duration::from_millis(150)).unwrap_err();
        assert!(
            matches!(timed_out, AdmissionError::Timeout { .. }),
            "{timed_out}"
        );
        let seen = server.join().unwrap();
        assert_eq!(seen.len(), 3);
        assert!(matches!(&seen[0], Request::Admit { attachment, .. } if *attachment == a));
    }
}
