//! The network configuration the runtime passes on stdin, parsed and validated before anything
//! touches the kernel or the disk.
//!
//! Parsing goes through `serde_json::Value` by hand instead of a derived struct so that a wrong
//! type yields error code 7 naming the exact key, and unknown keys are ignored as the spec asks.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::{IpNet, Ipv4Net};
use serde_json::{Map, Value};

use crate::capabilities::{self, RuntimeConfig};
use crate::env::{validate_ifname, Attachment};
use crate::node_state::first_host;
use crate::spec::{CniVersion, Dns, SuccessResult};

pub const DEFAULT_RUN_DIR: &str = "/run/veilnet";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/veilnet";
pub const DEFAULT_BRIDGE: &str = "veilbr0";
pub const DEFAULT_MTU: u32 = 1500;
/// The smallest MTU IPv4 allows, and the largest a Linux device accepts.
pub const MTU_RANGE: std::ops::RangeInclusive<u64> = 68..=65535;
pub const VALID_ATTACHMENTS_KEY: &str = "cni.dev/valid-attachments";

/// A parsed network configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    pub cni_version: CniVersion,
    /// The network name; names the IPAM directory.
    pub name: String,
    pub plugin_type: String,
    pub mode: Mode,
    /// IPAM records live in `<state_dir>/ipam/<name>/`.
    pub state_dir: PathBuf,
    /// Passed through into ADD results.
    pub dns: Dns,
    pub prev_result: Option<SuccessResult>,
    /// Only on GC.
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The capabilities this plugin entry declares (`"capabilities": {"ips": true}`).
    pub capabilities: std::collections::BTreeSet<String>,
    /// `runtimeConfig` values of declared capabilities (undeclared keys are ignored).
    pub runtime: RuntimeConfig,
}

/// Where the node's pod network comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// The veilnet agent writes `<run_dir>/node-state.json`.
    Agent { run_dir: PathBuf },
    /// Everything is in the configuration; the plugin creates the bridge itself.
    Standalone(StandaloneNet),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandaloneNet {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub bridge: String,
    /// `None`: take the bridge's MTU, or [`DEFAULT_MTU`] when the bridge is new.
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Code 6.
    #[error("cannot decode network configuration: {detail}")]
    Decode { detail: String },
    /// Code 1.
    #[error(
        "CNI version {version:?} is not supported (supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0)"
    )]
    Version { version: String },
    /// Code 7.
    #[error("required key {key:?} is missing")]
    Missing { key: &'static str },
    /// Code 7.
    #[error("key {key:?} must be {expected}, got {found}")]
    WrongType {
        key: &'static str,
        expected: &'static str,
        found: String,
    },
    /// Code 7.
    #[error("key {key:?} has invalid value {value}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
    /// Code 2: well-formed but something this plugin does not do.
    #[error("unsupported value {value} for key {key:?}: {reason}")]
    Unsupported {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl ConfigError {
    /// The key at fault, if any (for the error result's `msg`).
    pub fn key(&self) -> Option<&'static str> {
        match self {
            ConfigError::Decode { .. } => None,
            ConfigError::Version { .. } => Some("cniVersion"),
            ConfigError::Missing { key }
            | ConfigError::WrongType { key, .. }
            | ConfigError::Invalid { key, .. }
            | ConfigError::Unsupported { key, .. } => Some(key),
        }
    }
}

type Result<T> = std::result::Result<T, ConfigError>;

/// Decodes stdin far enough to learn `cniVersion`; used for VERSION and to print errors in the
/// caller's version even when the rest of the configuration is broken.
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    v.get("cniVersion")?.as_str().map(str::to_string)
}

/// Parses and validates a full network configuration.
pub fn parse(stdin: &[u8]) -> Result<NetConf> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| ConfigError::Decode {
        detail: e.to_string(),
    })?;
    let Value::Object(obj) = value else {
        return Err(ConfigError::Decode {
            detail: format!("expected a JSON object, got {}", kind(&value)),
        });
    };

    let version = required_str(&obj, "cniVersion")?;
    let cni_version = CniVersion::parse(version).ok_or_else(|| ConfigError::Version {
        version: version.to_string(),
    })?;
    let name = required_str(&obj, "name")?;
    validate_network_name(name)?;
    let plugin_type = required_str(&obj, "type")?.to_string();

    let state_dir = path(&obj, "stateDir")?.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let mode = if obj.contains_key("subnet") {
        Mode::Standalone(standalone(&obj)?)
    } else {
        Mode::Agent {
            run_dir: path(&obj, "runDir")?.unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR)),
        }
    };

    let dns = match obj.get("dns") {
        None | Some(Value::Null) => Dns::default(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| ConfigError::WrongType {
            key: "dns",
            expected: "an object with nameservers/domain/search/options",
            found: e.to_string(),
        })?,
    };
    let prev_result = match obj.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => {
            Some(
                serde_json::from_value(v.clone()).map_err(|e| ConfigError::Invalid {
                    key: "prevResult",
                    value: truncate(&v.to_string()),
                    reason: e.to_string(),
                })?,
            )
        }
        Some(other) => return Err(wrong_type("prevResult", "an object", other)),
    };
    let valid_attachments = match obj.get(VALID_ATTACHMENTS_KEY) {
        None | Some(Value::Null) => None,
        Some(v) => Some(attachments(v)?),
    };
    let declared = capabilities::declared(&obj)?;
    let runtime = capabilities::parse(&obj, &declared)?;

    Ok(NetConf {
        cni_version,
        name: name.to_string(),
        plugin_type,
        mode,
        state_dir,
        dns,
        prev_result,
        valid_attachments,
        capabilities: declared,
        runtime,
    })
}

fn standalone(obj: &Map<String, Value>) -> Result<StandaloneNet> {
    let subnet_text = required_str(obj, "subnet")?;
    let subnet: IpNet = subnet_text.parse().map_err(|_| ConfigError::Invalid {
        key: "subnet",
        value: subnet_text.to_string(),
        reason: "expected a CIDR such as 10.250.0.0/24".into(),
    })?;
    let subnet = match subnet {
        IpNet::V4(net) => net,
        IpNet::V6(_) => {
            return Err(ConfigError::Unsupported {
                key: "subnet",
                value: subnet_text.to_string(),
                reason: "only IPv4 pod subnets are supported",
            })
        }
    };
    if subnet.network() != subnet.addr() {
        return Err(ConfigError::Invalid {
            key: "subnet",
            value: subnet_text.to_string(),
            reason: format!("host bits are set; did you mean {}?", subnet.trunc()),
        });
    }
    if subnet.prefix_len() < crate::ipam::MIN_PREFIX_LEN {
        return Err(ConfigError::Invalid {
            key: "subnet",
            value: subnet_text.to_string(),
            reason: format!(
                "too large for one node (at least /{})",
                crate::ipam::MIN_PREFIX_LEN
            ),
        });
    }
    if subnet.prefix_len() > 30 {
        return Err(ConfigError::Invalid {
            key: "subnet",
            value: subnet_text.to_string(),
            reason: "too small: needs room for a gateway and a pod (at most /30)".into(),
        });
    }

    let gateway = match optional_str(obj, "gateway")? {
        None => first_host(subnet).ok_or_else(|| ConfigError::Invalid {
            key: "subnet",
            value: subnet_text.to_string(),
            reason: "has no host addresses".into(),
        })?,
        Some(text) => {
            let gw: Ipv4Addr = text.parse().map_err(|_| ConfigError::Invalid {
                key: "gateway",
                value: text.to_string(),
                reason: "expected an IPv4 address".into(),
            })?;
            if !subnet.contains(&gw) || gw == subnet.network() || gw == subnet.broadcast() {
                return Err(ConfigError::Invalid {
                    key: "gateway",
                    value: text.to_string(),
                    reason: format!("must be a host address inside {subnet}"),
                });
            }
            gw
        }
    };

    let bridge = optional_str(obj, "bridge")?.unwrap_or(DEFAULT_BRIDGE);
    validate_ifname(bridge).map_err(|reason| ConfigError::Invalid {
        key: "bridge",
        value: bridge.to_string(),
        reason: reason.to_string(),
    })?;

    let mtu = match obj.get("mtu") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let n = v
                .as_u64()
                .ok_or_else(|| wrong_type("mtu", "a positive integer", v))?;
            if !MTU_RANGE.contains(&n) {
                return Err(ConfigError::Invalid {
                    key: "mtu",
                    value: n.to_string(),
                    reason: "must be between 68 and 65535".into(),
                });
            }
            Some(n as u32)
        }
    };

    Ok(StandaloneNet {
        subnet,
        gateway,
        bridge: bridge.to_string(),
        mtu,
    })
}

fn attachments(v: &Value) -> Result<Vec<Attachment>> {
    const KEY: &str = VALID_ATTACHMENTS_KEY;
    let items = v.as_array().ok_or_else(|| wrong_type(KEY, "an array", v))?;
    items
        .iter()
        .map(|item| {
            let field = |name: &str| {
                item.get(name)
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| ConfigError::Invalid {
                        key: KEY,
                        value: truncate(&item.to_string()),
                        reason: format!("each entry needs a string {name:?}"),
                    })
            };
            Ok(Attachment {
                container_id: field("containerID")?,
                ifname: field("ifname")?,
            })
        })
        .collect()
}

/// The name becomes a directory, so it must be one safe path component.
fn validate_network_name(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
        || name.len() > 200;
    if bad {
        return Err(ConfigError::Invalid {
            key: "name",
            value: format!("{name:?}"),
            reason: "must be a non-empty name without '/' (it names the IPAM directory)".into(),
        });
    }
    Ok(())
}

fn required_str<'a>(obj: &'a Map<String, Value>, key: &'static str) -> Result<&'a str> {
    optional_str(obj, key)?.ok_or(ConfigError::Missing { key })
}

fn optional_str<'a>(obj: &'a Map<String, Value>, key: &'static str) -> Result<Option<&'a str>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(wrong_type(key, "a string", other)),
    }
}

fn path(obj: &Map<String, Value>, key: &'static str) -> Result<Option<PathBuf>> {
    match optional_str(obj, key)? {
        None => Ok(None),
        Some("") => Err(ConfigError::Invalid {
            key,
            value: "\"\"".into(),
            reason: "must not be empty".into(),
        }),
        Some(p) => Ok(Some(PathBuf::from(p))),
    }
}

fn wrong_type(key: &'static str, expected: &'static str, found: &Value) -> ConfigError {
    ConfigError::WrongType {
        key,
        expected,
        found: format!("{} {}", kind(found), truncate(&found.to_string())),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Keeps error messages short when a user pastes something huge.
fn truncate(s: &str) -> String {
    const MAX: usize = 120;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_json(v: Value) -> Result<NetConf> {
        parse(v.to_string().as_bytes())
    }

    fn standalone_conf() -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": "podnet",
            "type": "veilnet-cni",
            "subnet": "10.250.0.0/24",
            "stateDir": "/tmp/state",
        })
    }

    #[test]
    fn agent_mode_defaults() {
        let conf =
            parse_json(json!({"cniVersion": "1.0.0", "name": "veilnet", "type": "veilnet-cni"}))
                .unwrap();
        assert_eq!(conf.cni_version, CniVersion::V1_0_0);
        assert_eq!(
            conf.mode,
            Mode::Agent {
                run_dir: DEFAULT_RUN_DIR.into()
            }
        );
        assert_eq!(conf.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(conf.prev_result, None);
    }

    #[test]
    fn agent_mode_paths() {
        let conf = parse_json(json!({
            "cniVersion": "1.1.0", "name": "veilnet", "type": "veilnet-cni",
            "runDir": "/x/run", "stateDir": "/x/state", "someFutureKey": [1, 2]
        }))
        .unwrap();
        assert_eq!(
            conf.mode,
            Mode::Agent {
                run_dir: "/x/run".into()
            }
        );
        assert_eq!(conf.state_dir, PathBuf::from("/x/state"));
    }

    #[test]
    fn standalone_defaults() {
        let conf = parse_json(standalone_conf()).unwrap();
        assert_eq!(
            conf.mode,
            Mode::Standalone(StandaloneNet {
                subnet: "10.250.0.0/24".parse().unwrap(),
                gateway: "10.250.0.1".parse().unwrap(),
                bridge: DEFAULT_BRIDGE.into(),
                mtu: None,
            })
        );
    }

    #[test]
    fn standalone_explicit() {
        let mut v = standalone_conf();
        v["gateway"] = "10.250.0.254".into();
        v["bridge"] = "br-test".into();
        v["mtu"] = 1400.into();
        v["dns"] = json!({"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]});
        let conf = parse_json(v).unwrap();
        let Mode::Standalone(net) = conf.mode else {
            panic!("not standalone")
        };
        assert_eq!(net.gateway, Ipv4Addr::new(10, 250, 0, 254));
        assert_eq!(net.bridge, "br-test");
        assert_eq!(net.mtu, Some(1400));
        assert_eq!(conf.dns.nameservers, vec!["10.96.0.10".to_string()]);
    }

    fn err_with(key: &str, value: Value) -> ConfigError {
        let mut v = standalone_conf();
        v[key] = value;
        parse_json(v).unwrap_err()
    }

    #[test]
    fn wrong_types_name_the_key() {
        for (key, value) in [
            ("mtu", json!("1500")),
            ("mtu", json!(-1)),
            ("mtu", json!(1500.5)),
            ("subnet", json!(24)),
            ("gateway", json!(true)),
            ("bridge", json!(["a"])),
            ("stateDir", json!(1)),
            ("name", json!({})),
            ("dns", json!("8.8.8.8")),
            ("prevResult", json!([])),
            (VALID_ATTACHMENTS_KEY, json!({})),
        ] {
            let err = err_with(key, value.clone());
            assert_eq!(err.key(), Some(key_static(key)), "{key}={value}: {err}");
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    fn key_static(key: &str) -> &'static str {
        [
            "mtu",
            "subnet",
            "gateway",
            "bridge",
            "stateDir",
            "name",
            "dns",
            "prevResult",
            VALID_ATTACHMENTS_KEY,
        ]
        .into_iter()
        .find(|k| *k == key)
        .unwrap()
    }

    #[test]
    fn invalid_values() {
        assert!(matches!(
            err_with("mtu", json!(40)),
            ConfigError::Invalid { key: "mtu", .. }
        ));
        assert!(matches!(
            err_with("subnet", json!("10.250.0.0/31")),
            ConfigError::Invalid { key: "subnet", .. }
        ));
        assert!(matches!(
            err_with("subnet", json!("10.250.0.7/24")),
            ConfigError::Invalid { key: "subnet", .. }
        ));
        assert!(matches!(
            err_with("subnet", json!("10.0.0.0/4")),
            ConfigError::Invalid { key: "subnet", .. }
        ));
        assert!(matches!(
            err_with("subnet", json!("banana")),
            ConfigError::Invalid { key: "subnet", .. }
        ));
        assert!(matches!(
            err_with("subnet", json!("fd00::/64")),
            ConfigError::Unsupported { key: "subnet", .. }
        ));
        for gw in ["10.251.0.1", "10.250.0.0", "10.250.0.255", "x"] {
            assert!(matches!(
                err_with("gateway", json!(gw)),
                ConfigError::Invalid { key: "gateway", .. }
            ));
        }
        assert!(matches!(
            err_with("bridge", json!("a-very-long-bridge-name")),
            ConfigError::Invalid { key: "bridge", .. }
        ));
        assert!(matches!(
            err_with("name", json!("../etc")),
            ConfigError::Invalid { key: "name", .. }
        ));
        assert!(matches!(
            err_with("stateDir", json!("")),
            ConfigError::Invalid {
                key: "stateDir",
                ..
            }
        ));
    }

    #[test]
    fn missing_keys() {
        for key in ["cniVersion", "name", "type"] {
            let mut v = standalone_conf();
            v.as_object_mut().unwrap().remove(key);
            assert_eq!(parse_json(v).unwrap_err(), ConfigError::Missing { key });
        }
    }

    #[test]
    fn versions() {
        let mut v = standalone_conf();
        v["cniVersion"] = "0.2.0".into();
        assert!(matches!(
            parse_json(v.clone()).unwrap_err(),
            ConfigError::Version { .. }
        ));
        v["cniVersion"] = "0.3.1".into();
        assert_eq!(parse_json(v).unwrap().cni_version, CniVersion::V0_3_1);
    }

    #[test]
    fn malformed_json_is_decode_error() {
        for input in [&b"{"[..], b"", b"[1,2]", b"\xff\xfe", b"null"] {
            assert!(
                matches!(parse(input).unwrap_err(), ConfigError::Decode { .. }),
                "{input:?}"
            );
        }
    }

    #[test]
    fn prev_result_and_attachments() {
        let mut v = standalone_conf();
        v["prevResult"] = json!({
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "eth0", "sandbox": "/run/netns/x"}],
            "ips": [{"address": "10.250.0.5/24", "interface": 0}],
        });
        v[VALID_ATTACHMENTS_KEY] = json!([{"containerID": "c1", "ifname": "eth0"}]);
        let conf = parse_json(v.clone()).unwrap();
        assert_eq!(conf.prev_result.unwrap().interfaces[0].name, "eth0");
        assert_eq!(
            conf.valid_attachments.unwrap(),
            vec![Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            }]
        );
        v["prevResult"] = json!({"ips": [{"address": "not-an-ip"}]});
        assert_eq!(parse_json(v.clone()).unwrap_err().key(), Some("prevResult"));
        v["prevResult"] = Value::Null;
        v[VALID_ATTACHMENTS_KEY] = json!([{"containerID": 5}]);
        assert_eq!(
            parse_json(v).unwrap_err().key(),
            Some(VALID_ATTACHMENTS_KEY)
        );
    }

    #[test]
    fn peek_version_is_lenient() {
        assert_eq!(
            peek_version(br#"{"cniVersion":"9.9.9","mtu":"x"}"#),
            Some("9.9.9".into())
        );
        assert_eq!(peek_version(b"{"), None);
    }
}
