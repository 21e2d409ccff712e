//! The CNI capabilities veilnet-cni declares (CONVENTIONS.md): `ips`, `mac`, `bandwidth` and
//! `portMappings` (hostPort, see [`crate::hostport`]).
//!
//! A conflist entry declares `"capabilities": {"ips": true, ...}`; the runtime then injects
//! `runtimeConfig` with values for the declared ones only. The spec says a plugin must ignore
//! `runtimeConfig` keys it did not declare, so [`parse`] reads a key only when its capability is
//! declared `true` in the same configuration. Every value is validated here, before ADD touches
//! the kernel or the IPAM store, so a bad request leaves nothing behind.
//!
//! More capabilities slot in as another field of [`RuntimeConfig`], another arm in [`parse`] and
//! an entry in [`SUPPORTED`].

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use serde_json::{Map, Value};

use crate::config::ConfigError;
use crate::hostport::{PortMapping, Protocol};
use crate::netlink::{format_mac, parse_mac};

pub const CAP_IPS: &str = "ips";
pub const CAP_MAC: &str = "mac";
pub const CAP_BANDWIDTH: &str = "bandwidth";
pub const CAP_PORT_MAPPINGS: &str = "portMappings";
/// What this plugin honours; the agent's conflist declares exactly these.
pub const SUPPORTED: [&str; 4] = [CAP_IPS, CAP_MAC, CAP_BANDWIDTH, CAP_PORT_MAPPINGS];

const KEY_IPS: &str = "runtimeConfig.ips";
const KEY_MAC: &str = "runtimeConfig.mac";
const KEY_BANDWIDTH: &str = "runtimeConfig.bandwidth";
const KEY_PORT_MAPPINGS: &str = "runtimeConfig.portMappings";

/// The largest burst TBF can hold: its limit and bucket are 32-bit byte counts.
pub const MAX_BURST_BITS: u64 = (u32::MAX as u64) * 8;
/// Below one byte per second TBF's rate cannot be expressed.
pub const MIN_RATE_BITS: u64 = 8;
/// The TBF queue holds this much latency on top of the burst (as the reference plugin).
pub const TBF_LATENCY_MS: u64 = 25;
/// The bucket never holds more than this many milliseconds of traffic at the configured rate.
/// Runtimes send a placeholder burst (containerd: 2^32-1 bits, 512 MiB) because Kubernetes has
/// no burst annotation; taken literally that lets half a gigabyte through unshaped, so the limit
/// would not be a limit. 100 ms of the rate (but at least [`MIN_BUCKET_BYTES`]) keeps TCP
/// smooth and the rate honest.
pub const MAX_BUCKET_MS: u64 = 100;
pub const MIN_BUCKET_BYTES: u64 = 64 * 1024;

/// Values the runtime passed for declared capabilities.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// `ips`: the address the pod must get (veilnet pods have one IPv4 address).
    pub ip: Option<Ipv4Addr>,
    /// `mac`: the MAC of the pod's interface.
    pub mac: Option<[u8; 6]>,
    /// `bandwidth`: limits to apply with tc.
    pub bandwidth: Option<Bandwidth>,
    /// `portMappings`: hostPorts to DNAT to the pod (empty: none).
    pub port_mappings: Vec<PortMapping>,
}

/// One direction's limit, in bits per second and bits, as the runtime passes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub rate_bits: u64,
    pub burst_bits: u64,
}

/// `ingress`: traffic to the pod; `egress`: traffic from the pod.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bandwidth {
    pub ingress: Option<Limit>,
    pub egress: Option<Limit>,
}

/// A TBF qdisc as `tc` takes it: rate in bits/s, bucket and queue limit in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tbf {
    pub rate_bits: u64,
    pub burst_bytes: u64,
    pub limit_bytes: u64,
}

impl Limit {
    /// The TBF for this limit on a link of `mtu`: the bucket is the requested burst, capped at
    /// [`MAX_BUCKET_MS`] of the rate (see there), and never below one full packet (a bucket
    /// smaller than a packet would drop every full-size packet: such a burst is refused).
    pub fn tbf(&self, mtu: u32) -> Result<Tbf, String> {
        let requested = self.burst_bits / 8;
        // Ethernet header on top of the MTU: TBF counts whole frames.
        let packet = u64::from(mtu) + 14;
        if requested < packet {
            return Err(format!(
                "burst of {} bits ({requested} bytes) is smaller than one packet ({packet} bytes at MTU {mtu}): nothing could pass",
                self.burst_bits
            ));
        }
        let rate_bytes = self.rate_bits / 8;
        let cap = (rate_bytes.saturating_mul(MAX_BUCKET_MS) / 1000)
            .max(MIN_BUCKET_BYTES)
            .max(packet);
        let burst_bytes = requested.min(cap);
        let limit_bytes = (rate_bytes.saturating_mul(TBF_LATENCY_MS) / 1000)
            .saturating_add(burst_bytes)
            .min(u64::from(u32::MAX));
        Ok(Tbf {
            rate_bits: self.rate_bits,
            burst_bytes,
            limit_bytes,
        })
    }
}

/// The capabilities a plugin entry declares (`"capabilities": {"x": true}`; `false` is not a
/// declaration).
pub fn declared(obj: &Map<String, Value>) -> Result<BTreeSet<String>, ConfigError> {
    match obj.get("capabilities") {
        None | Some(Value::Null) => Ok(BTreeSet::new()),
        Some(Value::Object(caps)) => Ok(caps
            .iter()
            .filter(|(_, v)| v.as_bool() == Some(true))
            .map(|(k, _)| k.clone())
            .collect()),
        Some(other) => Err(ConfigError::WrongType {
            key: "capabilities",
            expected: "an object",
            found: other.to_string(),
        }),
    }
}

/// The `runtimeConfig` values of declared capabilities; undeclared keys are ignored.
pub fn parse(
    obj: &Map<String, Value>,
    declared: &BTreeSet<String>,
) -> Result<RuntimeConfig, ConfigError> {
    let runtime = match obj.get("runtimeConfig") {
        None | Some(Value::Null) => return Ok(RuntimeConfig::default()),
        Some(Value::Object(rc)) => rc,
        Some(other) => {
            return Err(ConfigError::WrongType {
                key: "runtimeConfig",
                expected: "an object",
                found: other.to_string(),
            })
        }
    };
    let get = |cap: &str| {
        declared
            .contains(cap)
            .then(|| runtime.get(cap))
            .flatten()
            .filter(|v| !v.is_null())
    };
    Ok(RuntimeConfig {
        ip: get(CAP_IPS).map(parse_ips).transpose()?.flatten(),
        mac: get(CAP_MAC).map(parse_mac_value).transpose()?,
        bandwidth: get(CAP_BANDWIDTH)
            .map(parse_bandwidth)
            .transpose()?
            .filter(|b| b.ingress.is_some() || b.egress.is_some()),
        port_mappings: get(CAP_PORT_MAPPINGS)
            .map(parse_port_mappings)
            .transpose()?
            .unwrap_or_default(),
    })
}

/// `[{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}]`: ports
/// 1-65535, `tcp` or `udp` (any case; absent or empty is `tcp`, as the reference plugin reads
/// it), `hostIP` an IPv4 address or empty/`0.0.0.0`/absent for every address of the node. The
/// same host side twice in one request is refused.
fn parse_port_mappings(v: &Value) -> Result<Vec<PortMapping>, ConfigError> {
    let items = v.as_array().ok_or_else(|| ConfigError::WrongType {
        key: KEY_PORT_MAPPINGS,
        expected: "an array of {hostPort, containerPort, protocol, hostIP}",
        found: v.to_string(),
    })?;
    let mut out: Vec<PortMapping> = Vec::new();
    for item in items {
        let obj = item.as_object().ok_or_else(|| {
            invalid(
                KEY_PORT_MAPPINGS,
                item,
                "each mapping must be an object with hostPort and containerPort",
            )
        })?;
        let port = |name: &str| -> Result<u16, ConfigError> {
            match obj.get(name) {
                None | Some(Value::Null) => Err(invalid(
                    KEY_PORT_MAPPINGS,
                    item,
                    format!("{name} is missing"),
                )),
                Some(n) => n
                    .as_u64()
                    .filter(|p| (1..=65535).contains(p))
                    .map(|p| p as u16)
                    .ok_or_else(|| {
                        invalid(
                            KEY_PORT_MAPPINGS,
                            item,
                            format!("{name} {n} is not a port (1-65535)"),
                        )
                    }),
            }
        };
        let host_port = port("hostPort")?;
        let container_port = port("containerPort")?;
        let protocol = match obj.get("protocol") {
            None | Some(Value::Null) => Protocol::Tcp,
            Some(Value::String(p)) => match p.to_ascii_lowercase().as_str() {
                "" | "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                "sctp" => {
                    return Err(ConfigError::Unsupported {
                        key: KEY_PORT_MAPPINGS,
                        value: item.to_string(),
                        reason: "SCTP hostPorts are not supported (veilnet maps tcp and udp)",
                    })
                }
                _ => {
                    return Err(invalid(
                        KEY_PORT_MAPPINGS,
                        item,
                        "protocol must be tcp or udp",
                    ))
                }
            },
            Some(_) => {
                return Err(invalid(
                    KEY_PORT_MAPPINGS,
                    item,
                    "protocol must be a string (tcp or udp)",
                ))
            }
        };
        let host_ip = match obj.get("hostIP") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => match s.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) if ip.is_unspecified() => None,
                Ok(IpAddr::V4(ip)) => Some(ip),
                Ok(IpAddr::V6(_)) => {
                    return Err(ConfigError::Unsupported {
                        key: KEY_PORT_MAPPINGS,
                        value: item.to_string(),
                        reason: "veilnet pods have IPv4 addresses only: hostIP must be IPv4",
                    })
                }
                Err(_) => return Err(invalid(KEY_PORT_MAPPINGS, item, "hostIP is not an address")),
            },
            Some(_) => return Err(invalid(KEY_PORT_MAPPINGS, item, "hostIP must be a string")),
        };
        let mapping = PortMapping {
            host_port,
            container_port,
            protocol,
            host_ip,
        };
        if let Some(twin) = out.iter().find(|m| m.overlaps(&mapping)) {
            return Err(invalid(
                KEY_PORT_MAPPINGS,
                v,
                format!(
                    "hostPort {} is asked for twice (also as {})",
                    mapping.host_side(),
                    twin.host_side()
                ),
            ));
        }
        out.push(mapping);
    }
    Ok(out)
}

fn invalid(key: &'static str, value: &Value, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// `["10.244.1.7"]` or `["10.244.1.7/24"]` (the convention allows either; a prefix, when given,
/// is checked against the pod CIDR at ADD).
fn parse_ips(v: &Value) -> Result<Option<Ipv4Addr>, ConfigError> {
    let items = v.as_array().ok_or_else(|| ConfigError::WrongType {
        key: KEY_IPS,
        expected: "an array of addresses",
        found: v.to_string(),
    })?;
    let mut v4 = Vec::new();
    for item in items {
        let text = item
            .as_str()
            .ok_or_else(|| invalid(KEY_IPS, item, "each entry must be a string address"))?;
        let addr_text = text.split_once('/').map_or(text, |(a, _)| a);
        let ip: IpAddr = match (addr_text.parse::<IpAddr>(), text.contains('/')) {
            (Ok(ip), false) => ip,
            (Ok(_), true) => text
                .parse::<ipnet::IpNet>()
                .map(|n| n.addr())
                .map_err(|_| invalid(KEY_IPS, item, "not an address or CIDR"))?,
            (Err(_), _) => return Err(invalid(KEY_IPS, item, "not an address or CIDR")),
        };
        match ip {
            IpAddr::V4(ip) => v4.push(ip),
            IpAddr::V6(_) => {
                return Err(ConfigError::Unsupported {
                    key: KEY_IPS,
                    value: item.to_string(),
                    reason: "veilnet pods have IPv4 addresses only",
                })
            }
        }
    }
    if v4.len() > 1 {
        return Err(ConfigError::Unsupported {
            key: KEY_IPS,
            value: v.to_string(),
            reason: "a veilnet pod interface has exactly one IPv4 address; ask for one",
        });
    }
    Ok(v4.first().copied())
}

fn parse_mac_value(v: &Value) -> Result<[u8; 6], ConfigError> {
    let text = v.as_str().ok_or_else(|| ConfigError::WrongType {
        key: KEY_MAC,
        expected: "a string like \"c2:11:22:33:44:55\"",
        found: v.to_string(),
    })?;
    let mac = parse_mac(&text.replace('-', ":"))
        .ok_or_else(|| invalid(KEY_MAC, v, "expected six hex octets like c2:11:22:33:44:55"))?;
    validate_unicast(&mac).map_err(|reason| invalid(KEY_MAC, v, reason))?;
    Ok(mac)
}

/// A pod MAC must be a unicast, non-zero address.
pub fn validate_unicast(mac: &[u8; 6]) -> Result<(), String> {
    if mac.iter().all(|b| *b == 0) {
        return Err("the all-zero MAC is not an address".into());
    }
    if mac[0] & 1 == 1 {
        return Err(format!(
            "{} is a multicast (or broadcast) address; the group bit of the first octet must be clear",
            format_mac(mac)
        ));
    }
    Ok(())
}

fn parse_bandwidth(v: &Value) -> Result<Bandwidth, ConfigError> {
    let obj = v.as_object().ok_or_else(|| ConfigError::WrongType {
        key: KEY_BANDWIDTH,
        expected: "an object with ingressRate/ingressBurst/egressRate/egressBurst",
        found: v.to_string(),
    })?;
    let number = |name: &str| -> Result<Option<u64>, ConfigError> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(n) => n.as_u64().map(Some).ok_or_else(|| {
                invalid(
                    KEY_BANDWIDTH,
                    v,
                    format!("{name} must be a non-negative integer"),
                )
            }),
        }
    };
    let direction = |dir: &str| -> Result<Option<Limit>, ConfigError> {
        let rate = number(&format!("{dir}Rate"))?;
        let burst = number(&format!("{dir}Burst"))?;
        match (rate, burst) {
            (None, None) => Ok(None),
            (Some(0), _) => Err(invalid(
                KEY_BANDWIDTH,
                v,
                format!("{dir}Rate of 0 would block all traffic; omit it for no limit"),
            )),
            (Some(rate), _) if rate < MIN_RATE_BITS => Err(invalid(
                KEY_BANDWIDTH,
                v,
                format!("{dir}Rate {rate} bit/s is below {MIN_RATE_BITS} bit/s"),
            )),
            (None, Some(_)) => Err(invalid(
                KEY_BANDWIDTH,
                v,
                format!("{dir}Burst without {dir}Rate"),
            )),
            (Some(_), None | Some(0)) => Err(invalid(
                KEY_BANDWIDTH,
                v,
                format!("{dir}Rate needs a {dir}Burst (bits) greater than 0"),
            )),
            (Some(_), Some(burst)) if burst > MAX_BURST_BITS => Err(invalid(
                KEY_BANDWIDTH,
                v,
                format!("{dir}Burst {burst} bits is more than 4 GiB, the most TBF can hold"),
            )),
            (Some(rate_bits), Some(burst_bits)) => Ok(Some(Limit {
                rate_bits,
                burst_bits,
            })),
        }
    };
    Ok(Bandwidth {
        ingress: direction("ingress")?,
        egress: direction("egress")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rc(conf: Value) -> Result<RuntimeConfig, ConfigError> {
        let obj = conf.as_object().unwrap().clone();
        parse(&obj, &declared(&obj)?)
    }

    fn all_caps(runtime: Value) -> Value {
        json!({"capabilities": {"ips": true, "mac": true, "bandwidth": true, "portMappings": true},
               "runtimeConfig": runtime})
    }

    fn err(runtime: Value) -> ConfigError {
        rc(all_caps(runtime.clone())).expect_err(&runtime.to_string())
    }

    #[test]
    fn declared_only() {
        let runtime = json!({"ips": ["10.0.0.5"], "mac": "c2:11:22:33:44:55",
                             "bandwidth": {"ingressRate": 1000000, "ingressBurst": 100000}});
        // Nothing declared: everything ignored, even garbage.
        assert_eq!(
            rc(json!({"runtimeConfig": runtime})).unwrap(),
            RuntimeConfig::default()
        );
        assert_eq!(
            rc(json!({"capabilities": {"ips": false, "mac": true},
                      "runtimeConfig": {"ips": "garbage", "mac": "c2:11:22:33:44:55",
                                        "bandwidth": 5}}))
            .unwrap(),
            RuntimeConfig {
                mac: Some([0xc2, 0x11, 0x22, 0x33, 0x44, 0x55]),
                ..RuntimeConfig::default()
            }
        );
        let all = rc(all_caps(runtime)).unwrap();
        assert_eq!(all.ip, Some(Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!(
            all.bandwidth.unwrap().ingress,
            Some(Limit {
                rate_bits: 1_000_000,
                burst_bits: 100_000
            })
        );
        assert_eq!(all.bandwidth.unwrap().egress, None);
        // Declared but not sent: nothing.
        assert_eq!(rc(all_caps(json!({}))).unwrap(), RuntimeConfig::default());
        assert_eq!(
            rc(json!({"capabilities": {"ips": true}})).unwrap(),
            RuntimeConfig::default()
        );
    }

    #[test]
    fn ips_forms() {
        let ip = |v: Value| rc(all_caps(json!({ "ips": v }))).unwrap().ip;
        assert_eq!(ip(json!(["10.0.0.5"])), Some(Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!(ip(json!(["10.0.0.5/24"])), Some(Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!(ip(json!([])), None);
    }

    #[test]
    fn bad_ips() {
        for (v, key_kind) in [
            (json!("10.0.0.5"), "type"),
            (json!([5]), "invalid"),
            (json!(["banana"]), "invalid"),
            (json!(["10.0.0.5/40"]), "invalid"),
            (json!(["fd00::5"]), "unsupported"),
            (json!(["10.0.0.5", "10.0.0.6"]), "unsupported"),
        ] {
            let e = err(json!({ "ips": v }));
            assert_eq!(e.key(), Some(KEY_IPS), "{e}");
            let ok = match key_kind {
                "type" => matches!(e, ConfigError::WrongType { .. }),
                "invalid" => matches!(e, ConfigError::Invalid { .. }),
                _ => matches!(e, ConfigError::Unsupported { .. }),
            };
            assert!(ok, "{v}: {e:?}");
        }
    }

    #[test]
    fn macs() {
        let mac = |v: &str| rc(all_caps(json!({ "mac": v }))).map(|r| r.mac);
        assert_eq!(
            mac("C2:11:22:33:44:55").unwrap(),
            Some([0xc2, 0x11, 0x22, 0x33, 0x44, 0x55])
        );
        assert_eq!(
            mac("c2-11-22-33-44-55").unwrap(),
            Some([0xc2, 0x11, 0x22, 0x33, 0x44, 0x55])
        );
        for (bad, why) in [
            ("c2:11:22:33:44", "six hex octets"),
            ("zz:11:22:33:44:55", "six hex octets"),
            ("00:00:00:00:00:00", "all-zero"),
            ("01:00:5e:00:00:01", "multicast"),
            ("ff:ff:ff:ff:ff:ff", "multicast"),
        ] {
            let e = mac(bad).unwrap_err();
            assert_eq!(e.key(), Some(KEY_MAC));
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
        assert!(matches!(
            err(json!({"mac": 5})),
            ConfigError::WrongType { key: KEY_MAC, .. }
        ));
    }

    #[test]
    fn bad_bandwidth() {
        for (bw, why) in [
            (json!("10M"), "an object"),
            (
                json!({"egressRate": 0, "egressBurst": 1000}),
                "egressRate of 0",
            ),
            (json!({"egressRate": 4, "egressBurst": 1000}), "below 8"),
            (json!({"ingressRate": 1000000}), "needs a ingressBurst"),
            (
                json!({"ingressRate": 1000000, "ingressBurst": 0}),
                "needs a ingressBurst",
            ),
            (json!({"ingressBurst": 1000}), "without ingressRate"),
            (
                json!({"ingressRate": 1000000, "ingressBurst": MAX_BURST_BITS + 1}),
                "more than 4 GiB",
            ),
            (
                json!({"ingressRate": -5, "ingressBurst": 10}),
                "non-negative",
            ),
            (
                json!({"ingressRate": "10M", "ingressBurst": 10}),
                "non-negative",
            ),
        ] {
            let e = err(json!({ "bandwidth": bw.clone() }));
            assert_eq!(e.key(), Some(KEY_BANDWIDTH), "{e}");
            assert!(e.to_string().contains(why), "{bw}: {e}");
        }
        // An empty object is no limit.
        assert_eq!(
            rc(all_caps(json!({"bandwidth": {}}))).unwrap().bandwidth,
            None
        );
    }

    #[test]
    fn tbf_parameters() {
        // containerd's placeholder burst (2^32-1 bits) is capped at 100 ms of the rate.
        let l = Limit {
            rate_bits: 10_000_000,
            burst_bits: u64::from(u32::MAX),
        };
        let t = l.tbf(1500).unwrap();
        assert_eq!(t.rate_bits, 10_000_000);
        assert_eq!(t.burst_bytes, 125_000);
        assert_eq!(t.limit_bytes, 125_000 + 31_250);
        // Slow rates keep a 64 KiB bucket; a small explicit burst is honoured.
        let slow = Limit {
            rate_bits: 100_000,
            burst_bits: 1 << 30,
        };
        assert_eq!(slow.tbf(1500).unwrap().burst_bytes, MIN_BUCKET_BYTES);
        let small = Limit {
            rate_bits: 10_000_000,
            burst_bits: 16_000 * 8,
        };
        assert_eq!(small.tbf(1500).unwrap().burst_bytes, 16_000);
        // Smaller than one packet: refused.
        let tiny = Limit {
            rate_bits: 10_000_000,
            burst_bits: 800,
        };
        assert!(tiny
            .tbf(1500)
            .unwrap_err()
            .contains("smaller than one packet"));
    }

    #[test]
    fn port_mappings() {
        let pm = |v: Value| rc(all_caps(json!({ "portMappings": v }))).map(|r| r.port_mappings);
        let got = pm(json!([
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""},
            {"hostPort": 53, "containerPort": 5353, "protocol": "UDP"},
            {"hostPort": 8443, "containerPort": 443, "hostIP": "192.0.2.1"},
            {"hostPort": 9000, "containerPort": 9000, "protocol": "", "hostIP": "0.0.0.0"}
        ]))
        .unwrap();
        assert_eq!(
            got,
            vec![
                PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: Protocol::Tcp,
                    host_ip: None
                },
                PortMapping {
                    host_port: 53,
                    container_port: 5353,
                    protocol: Protocol::Udp,
                    host_ip: None
                },
                PortMapping {
                    host_port: 8443,
                    container_port: 443,
                    protocol: Protocol::Tcp,
                    host_ip: Some(Ipv4Addr::new(192, 0, 2, 1))
                },
                PortMapping {
                    host_port: 9000,
                    container_port: 9000,
                    protocol: Protocol::Tcp,
                    host_ip: None
                },
            ]
        );
        assert_eq!(pm(json!([])).unwrap(), vec![]);
        // Undeclared: ignored, even garbage.
        assert_eq!(
            rc(json!({"capabilities": {"ips": true},
                      "runtimeConfig": {"portMappings": "garbage"}}))
            .unwrap()
            .port_mappings,
            vec![]
        );
    }

    #[test]
    fn bad_port_mappings() {
        for (v, kind, why) in [
            (json!({"hostPort": 80}), "type", "an array"),
            (json!([5]), "invalid", "must be an object"),
            (
                json!([{"containerPort": 80}]),
                "invalid",
                "hostPort is missing",
            ),
            (
                json!([{"hostPort": 80}]),
                "invalid",
                "containerPort is missing",
            ),
            (
                json!([{"hostPort": 0, "containerPort": 80}]),
                "invalid",
                "hostPort 0 is not a port",
            ),
            (
                json!([{"hostPort": 65536, "containerPort": 80}]),
                "invalid",
                "hostPort 65536",
            ),
            (
                json!([{"hostPort": -1, "containerPort": 80}]),
                "invalid",
                "hostPort -1",
            ),
            (
                json!([{"hostPort": 80, "containerPort": 0}]),
                "invalid",
                "containerPort 0",
            ),
            (
                json!([{"hostPort": "80", "containerPort": 80}]),
                "invalid",
                "not a port",
            ),
            (
                json!([{"hostPort": 80, "containerPort": 80, "protocol": "icmp"}]),
                "invalid",
                "tcp or udp",
            ),
            (
                json!([{"hostPort": 80, "containerPort": 80, "protocol": 6}]),
                "invalid",
                "must be a string",
            ),
            (
                json!([{"hostPort": 80, "containerPort": 80, "protocol": "SCTP"}]),
                "unsupported",
                "SCTP",
            ),
            (
                json!([{"hostPort": 80, "containerPort": 80, "hostIP": "fd00::1"}]),
                "unsupported",
                "IPv4",
            ),
            (
                json!([{"hostPort": 80, "containerPort": 80, "hostIP": "banana"}]),
                "invalid",
                "not an address",
            ),
            (
                json!([{"hostPort": 80, "containerPort": 80},
                    {"hostPort": 80, "containerPort": 81, "hostIP": "192.0.2.1"}]),
                "invalid",
                "asked for twice",
            ),
        ] {
            let e = err(json!({ "portMappings": v }));
            assert_eq!(e.key(), Some(KEY_PORT_MAPPINGS), "{e}");
            let ok = match kind {
                "type" => matches!(e, ConfigError::WrongType { .. }),
                "invalid" => matches!(e, ConfigError::Invalid { .. }),
                _ => matches!(e, ConfigError::Unsupported { .. }),
            };
            assert!(ok, "{v}: {e:?}");
            assert!(e.to_string().contains(why), "{v}: {e}");
        }
    }
}
