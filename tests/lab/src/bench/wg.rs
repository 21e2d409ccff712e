//! `veilnet bench wg-node`: one [`WgDevice`] with keys and peers from the command line, in the
//! calling process's network namespace, until SIGTERM/SIGINT. `scripts/bench.sh` starts one per
//! node namespace (`ip netns exec`) and puts addresses and routes on the TUN itself, so the
//! benchmark drives exactly the datapath the agent runs.

use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;

use veilnet::wg::{self, keys, PeerConfig, WgConfig, WgDevice};

#[derive(Debug, thiserror::Error)]
pub enum WgBenchError {
    #[error("reading the private key {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key: {0}")]
    Key(#[from] keys::KeyError),
    #[error("invalid --peer {spec:?}: {reason} (expected PUBKEY@IP:PORT=CIDR[,CIDR…])")]
    PeerSpec { spec: String, reason: String },
    #[error("wireguard: {0}")]
    Wg(#[from] wg::WgError),
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
}

#[derive(Debug, clap::Args)]
pub struct WgNodeArgs {
    /// TUN interface name.
    #[arg(long, default_value = "veilwg0")]
    pub tun: String,
    /// UDP listen port.
    #[arg(long, default_value_t = 51820)]
    pub port: u16,
    /// File holding the base64 private key (the `wg genkey` format).
    #[arg(long)]
    pub private_key_file: PathBuf,
    /// A peer: `PUBKEY@IP:PORT=CIDR[,CIDR…]` (repeatable).
    #[arg(long = "peer")]
    pub peers: Vec<String>,
    /// TUN MTU.
    #[arg(long, default_value_t = 1440)]
    pub mtu: u32,
    /// Leave the TUN in place on exit (and attach to it on start).
    #[arg(long)]
    pub persistent: bool,
    /// Runtime worker threads (the control side; packets move on the device's own thread).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Microseconds the datapath thread keeps polling after handling packets before it sleeps.
    #[arg(long, default_value_t = veilnet::wg::DEFAULT_BUSY_POLL.as_micros() as u64)]
    pub busy_poll_us: u64,
}

/// Parses `PUBKEY@IP:PORT=CIDR[,CIDR…]`.
pub fn parse_peer(spec: &str) -> Result<PeerConfig, WgBenchError> {
    let bad = |reason: &str| WgBenchError::PeerSpec {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let (key, rest) = spec.split_once('@').ok_or_else(|| bad("no '@'"))?;
    let (endpoint, nets) = rest.split_once('=').ok_or_else(|| bad("no '='"))?;
    let public_key = keys::decode_public(key)?;
    let endpoint: SocketAddr = endpoint.parse().map_err(|_| bad("bad endpoint"))?;
    let allowed_ips = nets
        .split(',')
        .filter(|n| !n.is_empty())
        .map(|n| n.parse::<IpNet>().map_err(|_| bad("bad CIDR")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PeerConfig {
        public_key,
        endpoint,
        allowed_ips,
        persistent_keepalive: None,
    })
}

pub fn run_node(args: WgNodeArgs) -> Result<(), WgBenchError> {
    let text = std::fs::read_to_string(&args.private_key_file).map_err(|source| {
        WgBenchError::ReadKey {
            path: args.private_key_file.clone(),
            source,
        }
    })?;
    let private_key = keys::decode_private(text.trim())?;
    let peers = args
        .peers
        .iter()
        .map(|p| parse_peer(p))
        .collect::<Result<Vec<_>, _>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .map_err(WgBenchError::Runtime)?;
    rt.block_on(async move {
        let mut cfg = WgConfig::new(args.tun, private_key, args.mtu);
        cfg.listen_port = args.port;
        cfg.persistent = args.persistent;
        cfg.busy_poll = std::time::Duration::from_micros(args.busy_poll_us);
        let dev = WgDevice::start(cfg).await?;
        dev.set_peers(peers)?;
        println!(
            "ready tun={} port={} public_key={}",
            dev.tun_name(),
            dev.listen_port(),
            keys::encode_public(&dev.public_key())
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(WgBenchError::Runtime)?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        dev.shutdown().await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_specs_parse_and_bad_ones_are_refused() {
        let key = keys::encode_public(&keys::public_key(&keys::generate()));
        let p = parse_peer(&format!("{key}@192.168.90.2:51820=10.91.0.2/32,fd00::/64")).unwrap();
        assert_eq!(p.endpoint, "192.168.90.2:51820".parse().unwrap());
        assert_eq!(p.allowed_ips.len(), 2);
        assert!(parse_peer(&format!("{key}192.168.90.2:51820=10.0.0.0/8")).is_err());
        assert!(parse_peer(&format!("{key}@192.168.90.2=10.0.0.0/8")).is_err());
        assert!(parse_peer(&format!("{key}@192.168.90.2:1=10.0.0.0/33")).is_err());
        assert!(parse_peer("nokey@192.168.90.2:1=10.0.0.0/8").is_err());
    }
}
