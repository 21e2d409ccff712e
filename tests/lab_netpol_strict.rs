//! `policyStrictMode` in the lab (needs root): two TCP connections to a server are established
//! before a policy that admits only one of the clients. With strict mode off both keep working
//! (the ruleset accepts `ct state established` first); with it on, the agent deletes the denied
//! connection's conntrack entry right after the ruleset change, its next segment meets the
//! server's ingress chain as a new connection and is dropped, and the allowed one keeps working.
//!
//! Server `x/server` on node-1; client `y/good` on node-2 (routed over the overlay), client
//! `y/bad` on node-1 (bridged, through br_netfilter). The tests run one after another.
//!
//! Control planes: both (`./scripts/test.sh` runs this file on the stand-in, then on the real one).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

/// One long-lived connection opened inside a pod's netns (the socket stays in that netns).
struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    n: u32,
}

impl Conn {
    fn open(netns: &str, target: SocketAddr) -> Conn {
        let stream = veilnet::netns::run_in(netns, move || {
            TcpStream::connect_timeout(&target, Duration::from_secs(2))
        })
        .expect("enter pod netns")
        .expect("connect to the server");
        let reader = BufReader::new(stream.try_clone().unwrap());
        Conn {
            stream,
            reader,
            n: 0,
        }
    }

    /// One request/answer on the connection (agnhost's line protocol), within `timeout`.
    fn works(&mut self, timeout: Duration) -> bool {
        self.n += 1;
        let nonce = format!("n{}", self.n);
        let _ = self.stream.set_read_timeout(Some(timeout));
        if self
            .stream
            .write_all(format!("veilnet-agnhost {nonce} strict\n").as_bytes())
            .is_err()
        {
            return false;
        }
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(n) if n > 0 => line.split(' ').nth(1) == Some(nonce.as_str()),
            _ => false,
        }
    }
}

fn namespace_manifest(ns: &str) -> String {
    serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": ns, "labels": {"ns": ns}}})
    .to_string()
}

struct Setup {
    lab: Lab,
    target: SocketAddr,
    bad_ns: String,
    good: Conn,
    bad: Conn,
}

fn setup(tag: &str, strict: bool) -> Setup {
    let flag = format!("--policy-strict-mode={strict}");
    let lab = Lab::up(tag, &["--nodes", "2", &flag]);
    for ns in ["x", "y"] {
        lab.apply(&namespace_manifest(ns));
    }
    let pods = [
        ("x", "server", "node-1", "server"),
        ("y", "good", "node-2", "good"),
        ("y", "bad", "node-1", "bad"),
    ];
    for (ns, name, node, role) in pods {
        lab.apply(&pod_manifest(ns, name, node, &[("role", role)], SERVE));
    }
    let server = lab.wait_pod_ip("x/server", Duration::from_secs(60));
    lab.wait_pod_ip("y/good", Duration::from_secs(60));
    lab.wait_pod_ip("y/bad", Duration::from_secs(60));
    let target: SocketAddr = format!("{server}:80").parse().unwrap();
    let good_ns = lab.pod_netns("y/good");
    let bad_ns = lab.pod_netns("y/bad");
    let mut good = Conn::open(&good_ns, target);
    let mut bad = Conn::open(&bad_ns, target);
    assert!(
        good.works(Duration::from_secs(2)),
        "good: no answer before any policy"
    );
    assert!(
        bad.works(Duration::from_secs(2)),
        "bad: no answer before any policy"
    );
    Setup {
        lab,
        target,
        bad_ns,
        good,
        bad,
    }
}

/// Admits only `y/good` to the server (returns when the policy was applied).
fn apply_only_good(s: &Setup) -> Instant {
    let applied = Instant::now();
    s.lab.apply(
        &serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": "x", "name": "only-good"},
            "spec": {"podSelector": {"matchLabels": {"role": "server"}},
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                            "podSelector": {"matchLabels": {"role": "good"}}}],
                                  "ports": [{"port": 80, "protocol": "TCP"}]}]}})
        .to_string(),
    );
    applied
}

/// Waits until a new connection from `y/bad` is refused (the ruleset is in the kernel).
fn wait_denied(s: &Setup) {
    let target = s.target.to_string();
    eventually(
        Duration::from_secs(10),
        "a new connection from y/bad is denied",
        || probe_in(&s.bad_ns, &target, "tcp", "300ms") != Some(0),
    );
}

#[test]
fn without_strict_mode_established_connections_survive_a_deny() {
    veilnet_test_support::require_root!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = setup("so", false);
    apply_only_good(&s);
    wait_denied(&s);
    for round in 0..5 {
        assert!(
            s.bad.works(Duration::from_secs(2)),
            "round {round}: the denied but established connection was cut without strict mode\n{}",
            s.lab.logs()
        );
        assert!(s.good.works(Duration::from_secs(2)), "round {round}: good");
        std::thread::sleep(Duration::from_millis(400));
    }
    let status = s.lab.policy_status(1);
    assert_eq!(status["connectionsCut"], 0, "{status}");
    eprintln!("strict mode off: the denied established connection still answers after 2s");
}

#[test]
fn strict_mode_cuts_denied_connections_and_keeps_allowed_ones() {
    veilnet_test_support::require_root!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = setup("sc", true);
    let applied = apply_only_good(&s);
    // Polled right away: the cut comes with the sync that loads the policy.
    let deadline = applied + Duration::from_secs(5);
    let cut = loop {
        if !s.bad.works(Duration::from_millis(200)) {
            break applied.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "strict mode: the denied connection still answers {:?} after the policy\n{}",
            applied.elapsed(),
            s.lab.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "strict mode on: denied established connection cut within {cut:?} of the policy's apply \
         (last probe's 200ms timeout included)"
    );
    wait_denied(&s);
    // It stays cut (retransmissions meet the default deny too) ...
    assert!(
        !s.bad.works(Duration::from_secs(1)),
        "the cut connection came back"
    );
    // ... and the allowed one never was.
    for round in 0..3 {
        assert!(
            s.good.works(Duration::from_secs(2)),
            "round {round}: strict mode cut an allowed connection\n{}",
            s.lab.logs()
        );
    }
    let status = s.lab.policy_status(1);
    assert!(
        status["connectionsCut"].as_u64().unwrap_or(0) >= 1,
        "node-1 reports no cut: {status}"
    );
    let log = s.lab.agent_log("node-1");
    let line = log
        .lines()
        .find(|l| l.contains("strict mode: established connections") && !l.contains("cut=0"))
        .map(str::to_string);
    assert!(
        line.is_some(),
        "no strict-mode line with a cut in node-1's agent log"
    );
    eprintln!("agent: {}", line.unwrap());
}
