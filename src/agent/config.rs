//! The agent's configuration: command-line flags and environment variables over an optional JSON
//! config file over defaults. Resolved once at start into an [`AgentConfig`] that is validated as a
//! whole, so a bad value fails the start with a message naming it instead of failing later.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;

use crate::logging::LogFormat;
use crate::model::encryption::{Mode, DEFAULT_WG_PORT};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// `veilnet agent` flags. Every flag also reads an environment variable, and every setting can come
/// from the config file (`--config`, JSON, keys in camelCase as in [`FileConfig`]).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct AgentArgs {
    /// Name of this node's Node object.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Kubeconfig to use; in-cluster configuration when absent.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// JSON config file (e.g. mounted from the veilnet ConfigMap).
    #[arg(long, env = "VEILNET_CONFIG")]
    pub config: Option<PathBuf>,
    /// Namespace holding veilnet's own objects (the pod CIDR allocation record).
    #[arg(long, env = "VEILNET_NAMESPACE")]
    pub namespace: Option<String>,
    /// Cluster pod CIDR, used when Nodes have no spec.podCIDR.
    #[arg(long, env = "VEILNET_CLUSTER_CIDR")]
    pub cluster_cidr: Option<Ipv4Net>,
    /// Prefix length of each node's pod CIDR when veilnet allocates it.
    #[arg(long, env = "VEILNET_NODE_CIDR_PREFIX")]
    pub node_cidr_prefix: Option<u8>,
    /// Persistent state (keys, IPAM).
    #[arg(long, env = "VEILNET_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Runtime files (node state for the CNI plugin, sockets).
    #[arg(long, env = "VEILNET_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    /// Where the CNI network configuration is installed.
    #[arg(long, env = "VEILNET_CNI_CONF_DIR")]
    pub cni_conf_dir: Option<PathBuf>,
    /// Where the CNI plugin binary lives.
    #[arg(long, env = "VEILNET_CNI_BIN_DIR")]
    pub cni_bin_dir: Option<PathBuf>,
    /// VXLAN network identifier.
    #[arg(long, env = "VEILNET_VXLAN_VNI")]
    pub vxlan_vni: Option<u32>,
    /// VXLAN UDP port.
    #[arg(long, env = "VEILNET_VXLAN_PORT")]
    pub vxlan_port: Option<u16>,
    /// This node's underlay address (default: the Node's InternalIP).
    #[arg(long, env = "VEILNET_UNDERLAY_IP")]
    pub underlay_ip: Option<IpAddr>,
    /// Pod MTU override (default: derived from the underlay route's MTU).
    #[arg(long, env = "VEILNET_MTU")]
    pub mtu: Option<u32>,
    /// Full resync period, e.g. 30s.
    #[arg(long, env = "VEILNET_RESYNC", value_parser = crate::duration::parse_duration)]
    pub resync: Option<Duration>,
    /// Address of the health endpoint (`/healthz`, `/readyz`, `/status`); loopback by default,
    /// where the kubelet's probes reach it and pods cannot.
    #[arg(long, env = "VEILNET_HEALTH_ADDR")]
    pub health_addr: Option<SocketAddr>,
    /// Address of the metrics endpoint (`/metrics`), where Prometheus scrapes it.
    #[arg(long, env = "VEILNET_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Address of the flows endpoint (`/flows`, the flow log for `veilnet observe`); pods are
    /// refused whatever the address (README: "Network security").
    #[arg(long, env = "VEILNET_FLOWS_ADDR")]
    pub flows_addr: Option<SocketAddr>,
    /// Encryption mode of nodes without a `veilnet.io/encryption` label.
    #[arg(long, env = "VEILNET_ENCRYPTION", value_enum)]
    pub encryption: Option<Mode>,
    /// WireGuard UDP port.
    #[arg(long, env = "VEILNET_WIREGUARD_PORT")]
    pub wireguard_port: Option<u16>,
    /// Do not enforce NetworkPolicy (removes veilnet's nft tables; ADD stops waiting for policy).
    #[arg(long, env = "VEILNET_NO_POLICY")]
    pub no_policy: bool,
    /// Flow log of policy verdicts, JSON lines (default `<runDir>/flows.jsonl`; `off` disables).
    #[arg(long, env = "VEILNET_FLOW_LOG")]
    pub flow_log: Option<PathBuf>,
    /// Also log connections that a policy allowed (rate-limited), not only denials.
    #[arg(long, env = "VEILNET_FLOW_LOG_ALLOWED")]
    pub flow_log_allowed: bool,
    /// Cut established connections that a NetworkPolicy change denies (their conntrack entries
    /// are deleted); `--policy-strict-mode=false` lets them run on. Default: on.
    #[arg(long, env = "VEILNET_POLICY_STRICT_MODE", num_args = 0..=1,
          default_missing_value = "true", require_equals = true)]
    pub policy_strict_mode: Option<bool>,
    /// SNAT pod traffic to destinations outside the cluster CIDR and `--non-masquerade-cidrs` to
    /// the node's address; `--masquerade=false` opts this node out. Default: on.
    #[arg(long, env = "VEILNET_MASQUERADE", num_args = 0..=1,
          default_missing_value = "true", require_equals = true)]
    pub masquerade: Option<bool>,
    /// Destinations that pods reach with their own address (routed networks that know the pod
    /// CIDRs), comma-separated CIDRs; replaces the config file's list.
    #[arg(long, env = "VEILNET_NON_MASQUERADE_CIDRS", value_delimiter = ',')]
    pub non_masquerade_cidrs: Option<Vec<Ipv4Net>>,
    /// Pods' DNS to servers outside `--trusted-dns`: `off` (not checked), `monitor` (counted and
    /// logged) or `enforce` (also dropped). A namespace's `veilnet.io/dns-mode` label overrides.
    #[arg(long, env = "VEILNET_DNS_MODE", value_enum)]
    pub dns_mode: Option<crate::dns::DnsMode>,
    /// The trusted DNS servers, comma-separated addresses or CIDRs (the cluster DNS Service and
    /// its endpoints); replaces the config file's list. Without any, the DNS guard is inactive.
    #[arg(long, env = "VEILNET_TRUSTED_DNS", value_delimiter = ',', value_parser = crate::dns::parse_net)]
    pub trusted_dns: Option<Vec<IpNet>>,
}

/// `trustedDns` entries in the config file: addresses or CIDRs, as on the command line.
fn file_nets<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<IpNet>>, D::Error> {
    let raw: Option<Vec<String>> = Deserialize::deserialize(d)?;
    raw.map(|list| {
        list.iter()
            .map(|s| crate::dns::parse_net(s).map_err(serde::de::Error::custom))
            .collect()
    })
    .transpose()
}

/// The config file's shape; every key optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    pub namespace: Option<String>,
    pub cluster_cidr: Option<Ipv4Net>,
    pub node_cidr_prefix: Option<u8>,
    pub state_dir: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub cni_conf_dir: Option<PathBuf>,
    pub cni_bin_dir: Option<PathBuf>,
    pub vxlan_vni: Option<u32>,
    pub vxlan_port: Option<u16>,
    pub mtu: Option<u32>,
    pub resync_seconds: Option<u64>,
    pub health_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub flows_addr: Option<SocketAddr>,
    pub encryption: Option<Mode>,
    pub wireguard_port: Option<u16>,
    /// `text` or `json`; `--log-format` / `VEILNET_LOG_FORMAT` win over it.
    pub log_format: Option<LogFormat>,
    pub policy_strict_mode: Option<bool>,
    pub masquerade: Option<bool>,
    pub non_masquerade_cidrs: Option<Vec<Ipv4Net>>,
    pub dns_mode: Option<crate::dns::DnsMode>,
    #[serde(default, deserialize_with = "file_nets")]
    pub trusted_dns: Option<Vec<IpNet>>,
    /// Network anomaly alerts: thresholds, or `enabled: false` (config file only).
    pub alerts: Option<crate::agent::alerts::AlertConfig>,
}

impl AgentArgs {
    /// The config file's log format, read before logging starts (errors surface later, in
    /// [`AgentConfig::resolve`], once they can be logged).
    pub fn file_log_format(&self) -> Option<LogFormat> {
        load_file(self.config.as_deref()?).ok()?.log_format
    }
}

/// The resolved, validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentConfig {
    pub node_name: String,
    pub kubeconfig: Option<PathBuf>,
    pub namespace: String,
    pub cluster_cidr: Ipv4Net,
    pub node_cidr_prefix: u8,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub vxlan_vni: u32,
    pub vxlan_port: u16,
    pub underlay_ip: Option<IpAddr>,
    pub mtu: Option<u32>,
    pub resync: Duration,
    pub health_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub flows_addr: SocketAddr,
    pub encryption: Mode,
    pub wireguard_port: u16,
    /// Established connections a policy change denies are cut ([`DEFAULT_POLICY_STRICT_MODE`]).
    pub policy_strict_mode: bool,
    /// Pod egress is masqueraded ([`DEFAULT_MASQUERADE`]; README: "Egress (masquerade)").
    pub masquerade: bool,
    /// Destinations outside the cluster CIDR that are not masqueraded.
    pub non_masquerade_cidrs: Vec<Ipv4Net>,
    /// Trusted DNS ([`crate::dns`]): the mode, [`DEFAULT_DNS_MODE`], and the trusted servers.
    pub dns: crate::dns::DnsGuard,
    /// Network anomaly alerts ([`crate::agent::alerts`]).
    pub alerts: crate::agent::alerts::AlertConfig,
}

pub const DEFAULT_NAMESPACE: &str = "veilnet-system";
pub const DEFAULT_CLUSTER_CIDR: &str = "10.244.0.0/16";
/// Linux's default VXLAN port (Flannel's too), not IANA's 4789, to coexist with other VTEPs.
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
pub const DEFAULT_HEALTH_ADDR: &str = "127.0.0.1:9891";
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9892";
pub const DEFAULT_NODE_CIDR_PREFIX: u8 = 24;
pub const DEFAULT_STATE_DIR: &str = "/var/lib/veilnet";
pub const DEFAULT_RUN_DIR: &str = "/run/veilnet";
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
pub const DEFAULT_CNI_BIN_DIR: &str = "/opt/cni/bin";
pub const DEFAULT_VXLAN_VNI: u32 = 1;
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(30);
pub const DEFAULT_ENCRYPTION: Mode = Mode::On;
/// A deny is a deny, for connections opened before it too (kube-network-policies' default; the
/// NetworkPolicy API leaves it open). README: "NetworkPolicy", strict mode.
pub const DEFAULT_POLICY_STRICT_MODE: bool = true;
/// Pods reach the world outside the cluster through the node's address (every CNI's default).
pub const DEFAULT_MASQUERADE: bool = true;
/// Untrusted DNS is counted and logged, not dropped, until an operator chooses `enforce`.
pub const DEFAULT_DNS_MODE: crate::dns::DnsMode = crate::dns::DnsMode::Monitor;

/// Each flag's default as `veilnet agent --help` shows it: the values [`AgentConfig::resolve`]
/// falls back to. (The flags carry no clap default, which would hide the config file's value.)
pub fn flag_defaults() -> Vec<(&'static str, String)> {
    let encryption = clap::ValueEnum::to_possible_value(&DEFAULT_ENCRYPTION)
        .map(|v| v.get_name().to_string())
        .unwrap_or_default();
    vec![
        ("namespace", DEFAULT_NAMESPACE.to_string()),
        ("cluster_cidr", DEFAULT_CLUSTER_CIDR.to_string()),
        ("node_cidr_prefix", DEFAULT_NODE_CIDR_PREFIX.to_string()),
        ("state_dir", DEFAULT_STATE_DIR.to_string()),
        ("run_dir", DEFAULT_RUN_DIR.to_string()),
        ("cni_conf_dir", DEFAULT_CNI_CONF_DIR.to_string()),
        ("cni_bin_dir", DEFAULT_CNI_BIN_DIR.to_string()),
        ("vxlan_vni", DEFAULT_VXLAN_VNI.to_string()),
        ("vxlan_port", DEFAULT_VXLAN_PORT.to_string()),
        ("resync", format!("{}s", DEFAULT_RESYNC.as_secs())),
        ("health_addr", DEFAULT_HEALTH_ADDR.to_string()),
        ("metrics_addr", DEFAULT_METRICS_ADDR.to_string()),
        (
            "flows_addr",
            crate::agent::flows::DEFAULT_FLOWS_ADDR.to_string(),
        ),
        ("encryption", encryption),
        ("wireguard_port", DEFAULT_WG_PORT.to_string()),
        ("policy_strict_mode", DEFAULT_POLICY_STRICT_MODE.to_string()),
        ("masquerade", DEFAULT_MASQUERADE.to_string()),
        ("non_masquerade_cidrs", "none".to_string()),
        ("dns_mode", DEFAULT_DNS_MODE.to_string()),
        ("trusted_dns", "none".to_string()),
    ]
}

/// Appends `[default: …]` to the help of each `veilnet agent` flag that has a default.
pub fn show_defaults(mut cmd: clap::Command) -> clap::Command {
    for (id, default) in flag_defaults() {
        cmd = cmd.mut_arg(id, |arg| {
            let with = |h: Option<&clap::builder::StyledStr>| {
                let h = h.map(|h| h.to_string()).unwrap_or_default();
                format!("{h} [default: {default}]")
            };
            let long = arg.get_long_help().map(|h| with(Some(h)));
            let arg = arg.clone().help(with(arg.get_help()));
            match long {
                Some(l) => arg.long_help(l),
                None => arg,
            }
        });
    }
    cmd
}

impl AgentConfig {
    pub fn resolve(args: &AgentArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let node_name = args
            .node_name
            .clone()
            .ok_or_else(|| ConfigError::Invalid("--node-name (or NODE_NAME) is required".into()))?;
        let cfg = AgentConfig {
            node_name,
            kubeconfig: args.kubeconfig.clone(),
            namespace: args
                .namespace
                .clone()
                .or(file.namespace)
                .unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
            cluster_cidr: args
                .cluster_cidr
                .or(file.cluster_cidr)
                .unwrap_or_else(|| DEFAULT_CLUSTER_CIDR.parse().expect("valid default CIDR")),
            node_cidr_prefix: args
                .node_cidr_prefix
                .or(file.node_cidr_prefix)
                .unwrap_or(DEFAULT_NODE_CIDR_PREFIX),
            state_dir: args
                .state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            run_dir: args
                .run_dir
                .clone()
                .or(file.run_dir)
                .unwrap_or_else(|| DEFAULT_RUN_DIR.into()),
            cni_conf_dir: args
                .cni_conf_dir
                .clone()
                .or(file.cni_conf_dir)
                .unwrap_or_else(|| DEFAULT_CNI_CONF_DIR.into()),
            cni_bin_dir: args
                .cni_bin_dir
                .clone()
                .or(file.cni_bin_dir)
                .unwrap_or_else(|| DEFAULT_CNI_BIN_DIR.into()),
            vxlan_vni: args
                .vxlan_vni
                .or(file.vxlan_vni)
                .unwrap_or(DEFAULT_VXLAN_VNI),
            vxlan_port: args
                .vxlan_port
                .or(file.vxlan_port)
                .unwrap_or(DEFAULT_VXLAN_PORT),
            underlay_ip: args.underlay_ip,
            mtu: args.mtu.or(file.mtu),
            resync: args
                .resync
                .or(file.resync_seconds.map(Duration::from_secs))
                .unwrap_or(DEFAULT_RESYNC),
            health_addr: args
                .health_addr
                .or(file.health_addr)
                .unwrap_or_else(|| DEFAULT_HEALTH_ADDR.parse().expect("valid default address")),
            metrics_addr: args
                .metrics_addr
                .or(file.metrics_addr)
                .unwrap_or_else(|| DEFAULT_METRICS_ADDR.parse().expect("valid default address")),
            flows_addr: args.flows_addr.or(file.flows_addr).unwrap_or_else(|| {
                crate::agent::flows::DEFAULT_FLOWS_ADDR
                    .parse()
                    .expect("valid default address")
            }),
            encryption: args
                .encryption
                .or(file.encryption)
                .unwrap_or(DEFAULT_ENCRYPTION),
            wireguard_port: args
                .wireguard_port
                .or(file.wireguard_port)
                .unwrap_or(DEFAULT_WG_PORT),
            policy_strict_mode: args
                .policy_strict_mode
                .or(file.policy_strict_mode)
                .unwrap_or(DEFAULT_POLICY_STRICT_MODE),
            masquerade: args
                .masquerade
                .or(file.masquerade)
                .unwrap_or(DEFAULT_MASQUERADE),
            non_masquerade_cidrs: args
                .non_masquerade_cidrs
                .clone()
                .or(file.non_masquerade_cidrs)
                .unwrap_or_default()
                .into_iter()
                .map(|c| c.trunc())
                .collect(),
            dns: crate::dns::DnsGuard {
                mode: args.dns_mode.or(file.dns_mode).unwrap_or(DEFAULT_DNS_MODE),
                trusted: args
                    .trusted_dns
                    .clone()
                    .or(file.trusted_dns)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|n| n.trunc())
                    .collect(),
            },
            alerts: file.alerts.unwrap_or_default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.node_name.is_empty() || self.node_name.len() > 253 {
            return bad(format!(
                "node name {:?} is not a valid Node name",
                self.node_name
            ));
        }
        let cluster_prefix = self.cluster_cidr.prefix_len();
        if self.node_cidr_prefix <= cluster_prefix || self.node_cidr_prefix > 30 {
            return bad(format!(
                "node CIDR prefix /{} must be longer than the cluster CIDR's /{cluster_prefix} and at most /30",
                self.node_cidr_prefix
            ));
        }
        if self.vxlan_vni == 0 || self.vxlan_vni >= 1 << 24 {
            return bad(format!(
                "VXLAN VNI {} must be in 1..16777215",
                self.vxlan_vni
            ));
        }
        if self.vxlan_port == 0 {
            return bad("VXLAN port must not be 0".into());
        }
        if self.dns.mode == crate::dns::DnsMode::Enforce && !self.dns.active() {
            return bad(
                "dnsMode enforce needs trustedDns (the cluster DNS Service and its endpoints): \
                 without it every pod's DNS would be dropped"
                    .into(),
            );
        }
        if self.wireguard_port == 0 || self.wireguard_port == self.vxlan_port {
            return bad(format!(
                "WireGuard port {} must be non-zero and differ from the VXLAN port",
                self.wireguard_port
            ));
        }
        if let Some(mtu) = self.mtu {
            if !(576..=65535).contains(&mtu) {
                return bad(format!("MTU {mtu} must be in 576..65535"));
            }
        }
        if self.resync < Duration::from_secs(1) {
            return bad("resync period must be at least 1s".into());
        }
        if self.health_addr.port() == self.metrics_addr.port()
            && self.health_addr != self.metrics_addr
        {
            return bad(format!(
                "health address {} and metrics address {} share a port: give them the same \
                 address (one listener) or different ports",
                self.health_addr, self.metrics_addr
            ));
        }
        for other in [self.health_addr, self.metrics_addr] {
            if self.flows_addr.port() == other.port() {
                return bad(format!(
                    "flows address {} shares its port with {other}: the flows endpoint needs                      a listener of its own (it refuses pods, the metrics endpoint does not)",
                    self.flows_addr
                ));
            }
        }
        Ok(())
    }
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `veilnet agent --node-name n EXTRA…` as clap parses it.
    fn parse_flags(extra: &[&str]) -> Result<AgentArgs, clap::Error> {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            agent: AgentArgs,
        }
        let mut argv = vec!["agent", "--node-name", "n"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| c.agent)
    }

    fn args() -> AgentArgs {
        AgentArgs {
            node_name: Some("node-1".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults() {
        let c = AgentConfig::resolve(&args()).unwrap();
        assert_eq!(c.namespace, "veilnet-system");
        assert_eq!(c.cluster_cidr.to_string(), "10.244.0.0/16");
        assert_eq!(
            (c.vxlan_vni, c.vxlan_port, c.node_cidr_prefix),
            (1, 8472, 24)
        );
        assert_eq!(c.cni_conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert!(c.policy_strict_mode);
    }

    #[test]
    fn policy_strict_mode_from_flag_env_and_file() {
        let parse = |extra: &[&str]| parse_flags(extra).map(|a| a.policy_strict_mode);
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(parse(&["--policy-strict-mode"]).unwrap(), Some(true));
        assert_eq!(parse(&["--policy-strict-mode=false"]).unwrap(), Some(false));
        assert!(parse(&["--policy-strict-mode=maybe"]).is_err());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, r#"{"policyStrictMode": false}"#).unwrap();
        let mut a = args();
        a.config = Some(path);
        assert!(!AgentConfig::resolve(&a).unwrap().policy_strict_mode);
        // The flag wins over the file.
        a.policy_strict_mode = Some(true);
        assert!(AgentConfig::resolve(&a).unwrap().policy_strict_mode);
    }

    #[test]
    fn masquerade_and_non_masquerade_cidrs_from_flag_and_file() {
        let parse = parse_flags;
        let c = AgentConfig::resolve(&parse(&[]).unwrap()).unwrap();
        assert!(c.masquerade);
        assert!(c.non_masquerade_cidrs.is_empty());
        let a = parse(&[
            "--masquerade=false",
            "--non-masquerade-cidrs",
            "192.168.0.0/16,172.30.0.254/32",
        ])
        .unwrap();
        let c = AgentConfig::resolve(&a).unwrap();
        assert!(!c.masquerade);
        assert_eq!(
            c.non_masquerade_cidrs,
            vec![
                "192.168.0.0/16".parse::<Ipv4Net>().unwrap(),
                "172.30.0.254/32".parse().unwrap()
            ]
        );
        assert!(parse(&["--non-masquerade-cidrs", "nonsense"]).is_err());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(
            &path,
            r#"{"masquerade": false, "nonMasqueradeCidrs": ["10.1.2.3/8"]}"#,
        )
        .unwrap();
        let mut a = args();
        a.config = Some(path);
        let c = AgentConfig::resolve(&a).unwrap();
        assert!(!c.masquerade);
        // Host bits are dropped, as the kernel's set would.
        assert_eq!(c.non_masquerade_cidrs, vec!["10.0.0.0/8".parse().unwrap()]);
        // The flag wins over the file.
        a.masquerade = Some(true);
        a.non_masquerade_cidrs = Some(vec![]);
        let c = AgentConfig::resolve(&a).unwrap();
        assert!(c.masquerade && c.non_masquerade_cidrs.is_empty());
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(
            &path,
            r#"{"clusterCidr": "10.50.0.0/16", "vxlanVni": 7, "mtu": 1400, "encryption": "strict"}"#,
        )
        .unwrap();
        let mut a = args();
        a.config = Some(path);
        a.vxlan_vni = Some(9);
        let c = AgentConfig::resolve(&a).unwrap();
        assert_eq!(c.cluster_cidr.to_string(), "10.50.0.0/16");
        assert_eq!(c.vxlan_vni, 9);
        assert_eq!(c.mtu, Some(1400));
        assert_eq!(c.encryption, Mode::Strict);
    }

    #[test]
    fn health_is_on_loopback_and_metrics_on_its_own_port() {
        let c = AgentConfig::resolve(&args()).unwrap();
        assert_eq!(c.health_addr.to_string(), "127.0.0.1:9891");
        assert_eq!(c.metrics_addr.to_string(), "0.0.0.0:9892");
        // One address for both is one listener; one port on two addresses cannot be bound.
        let mut a = args();
        a.metrics_addr = Some("127.0.0.1:9891".parse().unwrap());
        assert!(AgentConfig::resolve(&a).is_ok());
        a.metrics_addr = Some("0.0.0.0:9891".parse().unwrap());
        let e = AgentConfig::resolve(&a).unwrap_err().to_string();
        assert!(e.contains("share a port"), "{e}");
        // The flows endpoint refuses pods, so it never shares a listener with the others.
        let mut a = args();
        a.flows_addr = Some("0.0.0.0:9892".parse().unwrap());
        let e = AgentConfig::resolve(&a).unwrap_err().to_string();
        assert!(e.contains("flows address") && e.contains("its own"), "{e}");
        a.flows_addr = Some("127.0.0.1:9893".parse().unwrap());
        assert_eq!(
            AgentConfig::resolve(&a).unwrap().flows_addr.to_string(),
            "127.0.0.1:9893"
        );
    }

    #[test]
    fn bad_input_is_named() {
        let mut a = args();
        a.node_name = None;
        assert!(AgentConfig::resolve(&a)
            .unwrap_err()
            .to_string()
            .contains("--node-name"));
        let mut a = args();
        a.node_cidr_prefix = Some(8);
        assert!(AgentConfig::resolve(&a)
            .unwrap_err()
            .to_string()
            .contains("prefix"));
        let mut a = args();
        a.vxlan_vni = Some(1 << 24);
        assert!(AgentConfig::resolve(&a)
            .unwrap_err()
            .to_string()
            .contains("VNI"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, r#"{"clusterCIDR": "10.50.0.0/16"}"#).unwrap();
        let mut a = args();
        a.config = Some(path);
        let err = AgentConfig::resolve(&a).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
    }
}
