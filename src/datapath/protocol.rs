//! The control protocol between the agent and the datapath process: one JSON object per line over
//! a Unix stream socket, a request answered by exactly one response.
//!
//! Every response carries [`Info`] about the datapath (its instance, how it is configured), so the
//! agent notices on any call that the datapath restarted and must be configured again. New fields
//! must be optional (`#[serde(default)]`): an agent and a datapath of adjacent releases meet during
//! every upgrade, because the two roll separately. An incompatible change bumps [`PROTOCOL`].

use serde::{Deserialize, Serialize};

use crate::wg::{keys, DeviceStats, PeerChanges, PeerConfig, PeerStats, StaticSecret};

/// Version of this protocol; both sides refuse to talk to a different one.
pub const PROTOCOL: u32 = 1;

/// Largest request or response line. A peer list of thousands of nodes fits many times over; a
/// client that sends more is cut off instead of growing the datapath's memory.
pub const MAX_LINE: usize = 8 << 20;

/// The WireGuard device the agent wants: created (or re-created when the TUN name, port or MTU
/// changes), or re-keyed in place when only the key changes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {
    pub tun_name: String,
    pub listen_port: u16,
    pub mtu: u32,
    /// The private key in `wg genkey` form. It crosses only the root-owned 0600 socket.
    pub private_key: String,
}

impl DeviceSpec {
    pub fn new(tun_name: &str, listen_port: u16, mtu: u32, key: &StaticSecret) -> DeviceSpec {
        DeviceSpec {
            tun_name: tun_name.to_string(),
            listen_port,
            mtu,
            private_key: keys::encode_private(key),
        }
    }

    pub fn key(&self) -> Result<StaticSecret, keys::KeyError> {
        keys::decode_private(&self.private_key)
    }

    /// Whether `info` describes a device built from this spec (same TUN, port, MTU and key).
    pub fn matches(&self, info: &DeviceInfo) -> bool {
        let public = self
            .key()
            .map(|k| keys::encode_public(&keys::public_key(&k)));
        info.tun_name == self.tun_name
            && info.listen_port == self.listen_port
            && info.mtu == self.mtu
            && public.is_ok_and(|p| p == info.public_key)
    }
}

impl std::fmt::Debug for DeviceSpec {
    // Never print the private key (requests are logged at debug level).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSpec")
            .field("tun_name", &self.tun_name)
            .field("listen_port", &self.listen_port)
            .field("mtu", &self.mtu)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Request {
    /// Nothing but the [`Info`] every response carries.
    Hello,
    Configure {
        device: DeviceSpec,
    },
    /// Replaces the peer set (see `WgDevice::set_peers`: surviving keys keep their sessions).
    SetPeers {
        peers: Vec<PeerConfig>,
    },
    Stats,
}

/// Who answers: the datapath process and its device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Info {
    pub protocol: u32,
    /// The datapath binary's version.
    pub version: String,
    /// Random per process start: a new value means the datapath restarted.
    pub instance: String,
    pub pid: u32,
    /// Unix seconds when the process started.
    pub started_at: u64,
    /// `None` until the first `configure` (or a restore of the saved configuration).
    pub device: Option<DeviceInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceInfo {
    pub tun_name: String,
    pub listen_port: u16,
    pub mtu: u32,
    pub public_key: String,
    pub peers: usize,
    /// TUN offloads in effect and whether UDP GRO is on (for `veilnet status`).
    #[serde(default)]
    pub offloads: String,
    /// Milliseconds since the packet thread last went round its loop (see `probe`).
    #[serde(default)]
    pub turn_age_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Reply {
    Info,
    PeerChanges(PeerChanges),
    Stats {
        peers: Vec<PeerStats>,
        device: DeviceStats,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub info: Info,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    Ok(Reply),
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("message longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("connection closed")]
    Closed,
    #[error("socket I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes one message as a line.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let mut line = serde_json::to_vec(msg)?;
    line.push(b'\n');
    Ok(line)
}

/// Reads one line (bounded by [`MAX_LINE`]) and decodes it.
pub async fn read_message<T, R>(reader: &mut R) -> Result<T, ProtocolError>
where
    T: for<'de> Deserialize<'de>,
    R: tokio::io::AsyncBufRead + Unpin,
{
    use tokio::io::AsyncBufReadExt;
    let mut line = Vec::new();
    let mut limited = tokio::io::AsyncReadExt::take(reader, MAX_LINE as u64 + 1);
    let n = limited.read_until(b'\n', &mut line).await?;
    if n == 0 {
        return Err(ProtocolError::Closed);
    }
    if line.last() != Some(&b'\n') {
        // Either the peer hung up mid-line or the line is over the limit.
        return Err(if n > MAX_LINE {
            ProtocolError::TooLong
        } else {
            ProtocolError::Closed
        });
    }
    Ok(serde_json::from_slice(&line)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> Info {
        Info {
            protocol: PROTOCOL,
            version: "0.1.0".into(),
            instance: "abc".into(),
            pid: 7,
            started_at: 1,
            device: None,
        }
    }

    #[test]
    fn requests_and_responses_round_trip_as_single_lines() {
        let key = keys::generate();
        let peer = PeerConfig {
            public_key: keys::public_key(&keys::generate()),
            endpoint: "192.0.2.1:51820".parse().unwrap(),
            allowed_ips: vec!["10.244.1.0/24".parse().unwrap()],
            persistent_keepalive: Some(25),
        };
        for req in [
            Request::Hello,
            Request::Configure {
                device: DeviceSpec::new("veilwg0", 51820, 1390, &key),
            },
            Request::SetPeers {
                peers: vec![peer.clone()],
            },
            Request::Stats,
        ] {
            let line = encode(&req).unwrap();
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            let back: Request = serde_json::from_slice(&line).unwrap();
            assert_eq!(back, req);
        }
        let resp = Response {
            info: info(),
            outcome: Outcome::Ok(Reply::PeerChanges(PeerChanges {
                added: vec![peer.public_key],
                ..Default::default()
            })),
        };
        let text = String::from_utf8(encode(&resp).unwrap()).unwrap();
        assert!(text.contains(r#""ok":{"peerChanges""#), "{text}");
        let back: Response = serde_json::from_str(&text).unwrap();
        match back.outcome {
            Outcome::Ok(Reply::PeerChanges(c)) => assert_eq!(c.added, vec![peer.public_key]),
            other => panic!("{other:?}"),
        }
        let err: Response = serde_json::from_str(
            r#"{"info":{"protocol":1,"version":"x","instance":"i","pid":1,"startedAt":0,"device":null},"error":"no device"}"#,
        )
        .unwrap();
        assert!(matches!(err.outcome, Outcome::Error(m) if m == "no device"));
    }

    #[test]
    fn the_private_key_is_never_printed() {
        let spec = DeviceSpec::new("veilwg0", 51820, 1390, &keys::generate());
        let printed = format!(
            "{:?}",
            Request::Configure {
                device: spec.clone()
            }
        );
        assert!(!printed.contains(&spec.private_key), "{printed}");
        assert!(printed.contains("veilwg0"));
    }

    #[test]
    fn spec_matches_only_the_same_device_and_key() {
        let key = keys::generate();
        let spec = DeviceSpec::new("veilwg0", 51820, 1390, &key);
        let mut dev = DeviceInfo {
            tun_name: "veilwg0".into(),
            listen_port: 51820,
            mtu: 1390,
            public_key: keys::encode_public(&keys::public_key(&key)),
            peers: 0,
            offloads: String::new(),
            turn_age_ms: 0,
        };
        assert!(spec.matches(&dev));
        dev.mtu = 1440;
        assert!(!spec.matches(&dev));
        dev.mtu = 1390;
        dev.public_key = keys::encode_public(&keys::public_key(&keys::generate()));
        assert!(!spec.matches(&dev), "a rotated key must be pushed again");
    }

    #[tokio::test]
    async fn reading_rejects_garbage_overlong_and_truncated_lines() {
        let mut ok = tokio::io::BufReader::new(&b"{\"op\":\"hello\"}\n{\"op\":\"stats\"}\n"[..]);
        assert_eq!(
            read_message::<Request, _>(&mut ok).await.unwrap(),
            Request::Hello
        );
        assert_eq!(
            read_message::<Request, _>(&mut ok).await.unwrap(),
            Request::Stats
        );
        assert!(matches!(
            read_message::<Request, _>(&mut ok).await,
            Err(ProtocolError::Closed)
        ));
        let mut bad = tokio::io::BufReader::new(&b"{\"op\":\"format-disk\"}\n"[..]);
        assert!(matches!(
            read_message::<Request, _>(&mut bad).await,
            Err(ProtocolError::Malformed(_))
        ));
        let mut bad_key = tokio::io::BufReader::new(
            &br#"{"op":"setPeers","peers":[{"publicKey":"nope","endpoint":"192.0.2.1:1","allowedIps":[],"persistentKeepalive":null}]}
"#[..],
        );
        assert!(matches!(
            read_message::<Request, _>(&mut bad_key).await,
            Err(ProtocolError::Malformed(_))
        ));
        let mut cut = tokio::io::BufReader::new(&b"{\"op\":\"hel"[..]);
        assert!(matches!(
            read_message::<Request, _>(&mut cut).await,
            Err(ProtocolError::Closed)
        ));
        let long = vec![b' '; MAX_LINE + 10];
        let mut huge = tokio::io::BufReader::new(&long[..]);
        assert!(matches!(
            read_message::<Request, _>(&mut huge).await,
            Err(ProtocolError::TooLong)
        ));
    }
}
