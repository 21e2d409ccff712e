//! The CNI protocol's wire types (spec 0.3.0 to 1.1.0): versions, error results and success results.
//!
//! The shapes follow `SPEC.md` of containernetworking/cni: one [`SuccessResult`] type is rendered
//! per version, because the versions differ only in a few fields (0.x carries `ips[].version`,
//! 1.1.0 adds `interfaces[].mtu` and the route attributes `mtu`/`advmss`/`priority`/`table`/`scope`).

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// A CNI specification version this plugin serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    /// Every version we answer in `VERSION`, oldest first.
    pub const ALL: [CniVersion; 5] = [
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];
    /// Used for error results when the input names no usable version.
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// `None` for versions we do not serve (0.1.0, 0.2.0, or anything unknown).
    pub fn parse(s: &str) -> Option<CniVersion> {
        CniVersion::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// CHECK exists since 0.4.0.
    pub fn supports_check(self) -> bool {
        self >= CniVersion::V0_4_0
    }

    /// STATUS and GC exist since 1.1.0.
    pub fn supports_status_and_gc(self) -> bool {
        self >= CniVersion::V1_1_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error codes: 0-99 are the spec's well-known codes, 100+ are ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion,
    UnsupportedField,
    UnknownContainer,
    InvalidEnvironment,
    Io,
    Decode,
    InvalidConfig,
    TryAgainLater,
    NotAvailable,
    NotAvailableLimitedConnectivity,
    /// A netlink request failed.
    Kernel,
    /// The pod CIDR has no free address left.
    AddressesExhausted,
    /// `CNI_IFNAME` already exists in the pod (the spec requires ADD to fail then).
    InterfaceExists,
    /// CHECK found the pod's networking different from `prevResult`.
    CheckFailed,
    /// The address the `ips` capability asked for is held by another attachment.
    AddressInUse,
    /// A hostPort (`portMappings`) another attachment on this node holds.
    PortInUse,
    /// A bug: the plugin panicked. Never expected.
    Internal,
}

impl ErrorCode {
    pub fn code(self) -> u32 {
        match self {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::UnsupportedField => 2,
            ErrorCode::UnknownContainer => 3,
            ErrorCode::InvalidEnvironment => 4,
            ErrorCode::Io => 5,
            ErrorCode::Decode => 6,
            ErrorCode::InvalidConfig => 7,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::NotAvailable => 50,
            ErrorCode::NotAvailableLimitedConnectivity => 51,
            ErrorCode::Kernel => 100,
            ErrorCode::AddressesExhausted => 101,
            ErrorCode::InterfaceExists => 102,
            ErrorCode::CheckFailed => 103,
            ErrorCode::AddressInUse => 104,
            ErrorCode::PortInUse => 105,
            ErrorCode::Internal => 999,
        }
    }
}

/// The error result a plugin prints on stdout before exiting non-zero.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}{details}", if .details.is_empty() { "" } else { ": " })]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON document for stdout, in the protocol version in use.
    pub fn to_json(&self, version: CniVersion) -> String {
        serde_json::json!({
            "cniVersion": version.as_str(),
            "code": self.code.code(),
            "msg": self.msg,
            "details": self.details,
        })
        .to_string()
    }
}

/// `interfaces[]` of a success result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// 1.1.0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for interfaces inside the container, empty for host interfaces.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
    #[serde(
        default,
        rename = "socketPath",
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_path: Option<String>,
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

/// `ips[]` of a success result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with prefix length, host bits kept (`10.0.0.5/24`).
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    /// "4" or "6"; present only in 0.x results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// `routes[]` of a success result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

impl Route {
    pub fn via(dst: IpNet, gw: Option<IpAddr>) -> Route {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

/// `dns` of a success result (and of the network configuration, which passes it through).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// The success result of ADD (and the `prevResult` of CHECK/DEL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuccessResult {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

impl SuccessResult {
    pub fn empty(version: CniVersion) -> SuccessResult {
        SuccessResult {
            cni_version: version.as_str().to_string(),
            interfaces: Vec::new(),
            ips: Vec::new(),
            routes: Vec::new(),
            dns: Dns::default(),
        }
    }

    /// Adjusts the fields that differ between spec versions, so the serialized form is exactly
    /// that version's shape.
    pub fn for_version(mut self, version: CniVersion) -> SuccessResult {
        self.cni_version = version.as_str().to_string();
        let zero_x = version < CniVersion::V1_0_0;
        for ip in &mut self.ips {
            ip.version = zero_x.then(|| {
                match ip.address {
                    IpNet::V4(_) => "4",
                    IpNet::V6(_) => "6",
                }
                .to_string()
            });
        }
        if version < CniVersion::V1_1_0 {
            for iface in &mut self.interfaces {
                iface.mtu = None;
                iface.socket_path = None;
                iface.pci_id = None;
            }
            for route in &mut self.routes {
                route.mtu = None;
                route.advmss = None;
                route.priority = None;
                route.table = None;
                route.scope = None;
            }
        }
        self
    }

    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail; fall back to an empty object
        // rather than panicking if it ever did.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string())
    }
}

/// The result of `VERSION`.
pub fn version_result_json(requested: &str) -> String {
    let supported: Vec<&str> = CniVersion::ALL.iter().map(|v| v.as_str()).collect();
    serde_json::json!({
        "cniVersion": requested,
        "supportedVersions": supported,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn sample() -> SuccessResult {
        SuccessResult {
            cni_version: String::new(),
            interfaces: vec![
                Interface {
                    name: "veil0123456789a".into(),
                    mac: "aa:bb:cc:dd:ee:ff".into(),
                    mtu: Some(1450),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:01".into(),
                    mtu: Some(1450),
                    sandbox: "/run/netns/pod".into(),
                    ..Default::default()
                },
            ],
            ips: vec![IpConfig {
                address: "10.250.0.2/24".parse().unwrap(),
                gateway: Some("10.250.0.1".parse().unwrap()),
                interface: Some(1),
                version: None,
            }],
            routes: vec![Route::via(
                "0.0.0.0/0".parse().unwrap(),
                Some("10.250.0.1".parse().unwrap()),
            )],
            dns: Dns::default(),
        }
    }

    #[test]
    fn versions_parse_and_order() {
        assert_eq!(CniVersion::parse("1.1.0"), Some(CniVersion::V1_1_0));
        assert_eq!(CniVersion::parse("0.2.0"), None);
        assert_eq!(CniVersion::parse("2.0.0"), None);
        assert!(CniVersion::V0_4_0.supports_check());
        assert!(!CniVersion::V0_3_1.supports_check());
        assert!(CniVersion::V1_1_0.supports_status_and_gc());
        assert!(!CniVersion::V1_0_0.supports_status_and_gc());
    }

    #[test]
    fn result_1_1_0_shape() {
        let v: Value =
            serde_json::from_str(&sample().for_version(CniVersion::V1_1_0).to_json()).unwrap();
        assert_eq!(
            v,
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [
                    {"name": "veil0123456789a", "mac": "aa:bb:cc:dd:ee:ff", "mtu": 1450},
                    {"name": "eth0", "mac": "02:00:00:00:00:01", "mtu": 1450, "sandbox": "/run/netns/pod"}
                ],
                "ips": [{"address": "10.250.0.2/24", "gateway": "10.250.0.1", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.250.0.1"}],
                "dns": {}
            })
        );
    }

    #[test]
    fn result_1_0_0_has_no_1_1_fields() {
        let v: Value =
            serde_json::from_str(&sample().for_version(CniVersion::V1_0_0).to_json()).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(v["interfaces"][0].get("mtu").is_none());
        assert!(v["ips"][0].get("version").is_none());
        assert_eq!(v["ips"][0]["interface"], 1);
    }

    #[test]
    fn result_0_x_has_ip_version() {
        let v: Value =
            serde_json::from_str(&sample().for_version(CniVersion::V0_4_0).to_json()).unwrap();
        assert_eq!(v["ips"][0]["version"], "4");
        assert_eq!(v["cniVersion"], "0.4.0");
    }

    #[test]
    fn prev_result_round_trips_from_0_x() {
        let text = sample().for_version(CniVersion::V0_3_1).to_json();
        let back: SuccessResult = serde_json::from_str(&text).unwrap();
        assert_eq!(
            back.ips[0].address,
            "10.250.0.2/24".parse::<IpNet>().unwrap()
        );
        let again = back.for_version(CniVersion::V1_1_0);
        assert_eq!(again.ips[0].version, None);
    }

    #[test]
    fn error_json_shape() {
        let e = CniError::new(ErrorCode::InvalidConfig, "bad mtu", "key \"mtu\" must be");
        let v: Value = serde_json::from_str(&e.to_json(CniVersion::V1_0_0)).unwrap();
        assert_eq!(
            v,
            json!({"cniVersion": "1.0.0", "code": 7, "msg": "bad mtu", "details": "key \"mtu\" must be"})
        );
    }

    #[test]
    fn version_result_lists_all() {
        let v: Value = serde_json::from_str(&version_result_json("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }
}
