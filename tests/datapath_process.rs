//! Root tests of `veilnet datapath`, the process that owns the WireGuard device, driven through its
//! control socket as the agent drives it: configure, peers, statistics, hostile input, a second
//! instance, a restart that restores the saved configuration, a rebuild on an MTU change. The
//! process runs in a namespace named `veildp-…` that a guard deletes, with the process, also when
//! a test fails.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use veilnet::datapath::protocol::{DeviceSpec, Outcome, Reply, Request, Response};
use veilnet::netns;
use veilnet::wg::{keys, PeerConfig};
use veilnet_test_support::{require_root, Netns};

struct Node {
    ns: Netns,
    run_dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Node {
    fn new() -> Node {
        Node {
            ns: Netns::new("veildp", ""),
            run_dir: tempfile::tempdir().unwrap(),
            child: None,
        }
    }

    fn socket(&self) -> PathBuf {
        veilnet::datapath::socket_path(self.run_dir.path())
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_veilnet"));
        cmd.args(["datapath", "--run-dir"])
            .arg(self.run_dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        netns::command_in(&self.ns, &mut cmd).unwrap();
        cmd
    }

    fn start(&mut self) {
        let child = self.command().spawn().unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(self.socket()).is_err() {
            assert!(Instant::now() < deadline, "the datapath never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait: the clean exit of a rollout.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let status = c.wait().unwrap();
            assert!(status.success(), "datapath exit: {status}");
        }
    }

    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.ns])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Node {
    /// The datapath first (reaped); the namespace goes after this.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A raw line client (not the agent's), so the tests can also send garbage.
struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    fn open(socket: &Path) -> Conn {
        let s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Conn {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    fn raw(&mut self, line: &[u8]) -> Response {
        self.writer.write_all(line).unwrap();
        let mut resp = String::new();
        self.reader.read_line(&mut resp).unwrap();
        serde_json::from_str(&resp).unwrap_or_else(|e| panic!("{e}: {resp:?}"))
    }

    fn call(&mut self, req: &Request) -> Response {
        let mut line = serde_json::to_vec(req).unwrap();
        line.push(b'\n');
        self.raw(&line)
    }

    fn ok(&mut self, req: &Request) -> (Response, Reply) {
        let resp = self.call(req);
        match resp.outcome.clone() {
            Outcome::Ok(reply) => (resp, reply),
            Outcome::Error(e) => panic!("{req:?} refused: {e}"),
        }
    }
}

fn peer(n: u8, cidr: &str) -> PeerConfig {
    PeerConfig {
        public_key: keys::public_key(&keys::generate()),
        endpoint: format!("192.0.2.{n}:51820").parse().unwrap(),
        allowed_ips: vec![cidr.parse().unwrap()],
        persistent_keepalive: None,
    }
}

fn error_of(resp: &Response) -> String {
    match &resp.outcome {
        Outcome::Error(e) => e.clone(),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn the_datapath_serves_the_agent_survives_bad_input_and_restores_itself() {
    require_root!();
    let mut node = Node::new();
    node.start();
    let mut c = Conn::open(&node.socket());

    let (hello, _) = c.ok(&Request::Hello);
    assert!(hello.info.device.is_none(), "{hello:?}");
    assert_eq!(hello.info.protocol, veilnet::datapath::protocol::PROTOCOL);
    let first_instance = hello.info.instance.clone();

    // Before a device exists, peers are refused with a reason; garbage is answered, not fatal.
    let early = c.call(&Request::SetPeers {
        peers: vec![peer(1, "10.244.1.0/24")],
    });
    assert!(error_of(&early).contains("not configured"), "{early:?}");
    let garbage = c.raw(b"{\"op\":\"rm -rf\"}\n");
    assert!(error_of(&garbage).contains("malformed"), "{garbage:?}");
    let bad_key = c.call(&Request::Configure {
        device: DeviceSpec {
            tun_name: "veilwg0".into(),
            listen_port: 51820,
            mtu: 1390,
            private_key: "not a key".into(),
        },
    });
    assert!(error_of(&bad_key).contains("key"), "{bad_key:?}");
    assert!(c.ok(&Request::Hello).0.info.device.is_none());

    // Configure: the TUN appears in the namespace with the MTU asked for.
    let key = keys::generate();
    let spec = DeviceSpec::new("veilwg0", 51820, 1390, &key);
    let (configured, _) = c.ok(&Request::Configure {
        device: spec.clone(),
    });
    let dev = configured.info.device.expect("a device");
    assert!(spec.matches(&dev), "{dev:?}");
    assert!(dev.offloads.starts_with("tun:"), "{dev:?}");
    assert!(node.ip(&["link", "show", "veilwg0"]).contains("mtu 1390"));

    // Peers: added, then unchanged; a conflicting set is refused and changes nothing.
    let peers = vec![peer(1, "10.244.1.0/24"), peer(2, "10.244.2.0/24")];
    let set = Request::SetPeers {
        peers: peers.clone(),
    };
    match c.ok(&set).1 {
        Reply::PeerChanges(ch) => assert_eq!(ch.added.len(), 2),
        other => panic!("{other:?}"),
    }
    match c.ok(&set).1 {
        Reply::PeerChanges(ch) => assert!(ch.is_empty() && ch.unchanged == 2, "{ch:?}"),
        other => panic!("{other:?}"),
    }
    let conflict = c.call(&Request::SetPeers {
        peers: vec![peer(3, "10.244.1.0/24"), peer(4, "10.244.1.0/24")],
    });
    assert!(error_of(&conflict).contains("claimed by"), "{conflict:?}");
    match c.ok(&Request::Stats).1 {
        Reply::Stats { peers: got, .. } => {
            let mut want: Vec<String> = peers
                .iter()
                .map(|p| keys::encode_public(&p.public_key))
                .collect();
            let mut have: Vec<String> = got
                .iter()
                .map(|p| keys::encode_public(&p.public_key))
                .collect();
            want.sort();
            have.sort();
            assert_eq!(have, want, "the refused set changed the peers");
        }
        other => panic!("{other:?}"),
    }

    // A second datapath on the same socket refuses to start: two must never share one TUN.
    let second = node.command().output().unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already serves"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(
        c.ok(&Request::Hello).0.info.device.is_some(),
        "the first one is unharmed"
    );

    // The liveness probe: up, with the packet thread turning (it turns every timer tick).
    let probe = |node: &Node| {
        Command::new(env!("CARGO_BIN_EXE_veilnet"))
            .args(["datapath", "--probe", "--run-dir"])
            .arg(node.run_dir.path())
            .output()
            .unwrap()
    };
    let ok = probe(&node);
    let text = String::from_utf8_lossy(&ok.stdout).into_owned();
    assert!(
        ok.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(text.contains("2 peers"), "{text}");

    // The saved configuration holds the key: 0600.
    let state = node.run_dir.path().join(veilnet::datapath::STATE_FILE);
    let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Restart: the new process restores the device and the peers on its own (no agent here).
    drop(c);
    node.stop();
    assert!(
        node.ip(&["link", "show", "veilwg0"]).contains("veilwg0"),
        "the TUN is persistent"
    );
    let down = probe(&node);
    assert!(!down.status.success(), "the probe passes with no datapath");
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("cannot reach the datapath"),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    node.start();
    let mut c = Conn::open(&node.socket());
    let (after, _) = c.ok(&Request::Hello);
    assert_ne!(after.info.instance, first_instance, "a new instance");
    let dev = after.info.device.expect("restored device");
    assert!(spec.matches(&dev), "{dev:?}");
    assert_eq!(dev.peers, 2);

    // An MTU change rebuilds the device in place and carries the peers over.
    let bigger = DeviceSpec::new("veilwg0", 51820, 1420, &key);
    let (rebuilt, _) = c.ok(&Request::Configure { device: bigger });
    assert_eq!(rebuilt.info.device.as_ref().unwrap().peers, 2);
    assert!(node.ip(&["link", "show", "veilwg0"]).contains("mtu 1420"));

    // A line over the size limit is refused and the connection closed; the process lives on.
    let mut huge = vec![b'x'; veilnet::datapath::protocol::MAX_LINE + 16];
    huge.push(b'\n');
    let resp = c.raw(&huge);
    assert!(error_of(&resp).contains("longer than"), "{resp:?}");
    let mut c = Conn::open(&node.socket());
    assert!(c.ok(&Request::Hello).0.info.device.is_some());
    node.stop();
}
