//! A real Prometheus (Debian's `prometheus` package) in the lab's control-plane namespace scrapes
//! every agent's `/metrics` and evaluates the alert rules of `manifests/prometheus-rules.rules.yml`:
//! kill a node's datapath and `VeilnetDatapathDown` fires for that node only; restart it and the
//! alert clears. The rules are a copy of the manifest's with that alert's `for:` shortened from
//! 1m to 2s (everything else as shipped); scrape and evaluation run every second. Also checks the
//! names real agents export against `veilnet::agent::metrics::exported_names()`, the list the
//! dashboard test checks queries against. Needs root.
//!
//! Control planes: both (`./scripts/test.sh` runs this file on the stand-in, then on the real one).

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const PORT: u16 = 19090;
const NODES: [&str; 2] = ["172.30.0.11:9892", "172.30.0.12:9892"];

/// The Prometheus process; killed (and reaped) on drop, also when the test fails.
struct Prometheus {
    child: Child,
    netns: String,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(lab: &Lab) -> Prometheus {
        let netns = lab.control_plane_netns();
        let dir = PathBuf::from("/var/lib/veilnet-lab")
            .join(&lab.name)
            .join("prometheus");
        std::fs::create_dir_all(dir.join("data")).unwrap();

        // The shipped rules with VeilnetDatapathDown's `for:` shortened (JSON is YAML).
        let rules_text = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("manifests/prometheus-rules.rules.yml"),
        )
        .unwrap();
        let mut rules: Value = serde_saphyr::from_str(&rules_text).unwrap();
        let mut shortened = 0;
        for g in rules["groups"].as_array_mut().unwrap() {
            for r in g["rules"].as_array_mut().unwrap() {
                if r["alert"] == "VeilnetDatapathDown" {
                    assert_eq!(r["for"], "1m", "the shipped rule changed: adjust this test");
                    r["for"] = "2s".into();
                    shortened += 1;
                }
            }
        }
        assert_eq!(shortened, 1, "no VeilnetDatapathDown rule");
        let rules_file = dir.join("rules.yml");
        std::fs::write(&rules_file, serde_json::to_string_pretty(&rules).unwrap()).unwrap();

        let config = serde_json::json!({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [rules_file],
            "scrape_configs": [{"job_name": "veilnet", "static_configs": [{"targets": NODES}]}],
        });
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, serde_json::to_string_pretty(&config).unwrap()).unwrap();

        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &netns, "prometheus"])
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{PORT}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect(
                "run prometheus (Debian's `prometheus` package; ./scripts/test.sh installs it)",
            );
        Prometheus { child, netns, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET an API path from inside the control-plane namespace; `None` while Prometheus does not
    /// answer. HTTP/1.0, so the body comes unchunked.
    fn get(&self, path: &str) -> Option<Value> {
        let path = path.to_string();
        let raw = veilnet::netns::run_in(&self.netns, move || -> Option<String> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", PORT)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n").ok()?;
            let mut raw = String::new();
            s.read_to_string(&mut raw).ok()?;
            Some(raw)
        })
        .expect("run in the control-plane namespace")?;
        let (_, body) = raw.split_once("\r\n\r\n")?;
        let v: Value = serde_json::from_str(body).ok()?;
        (v["status"] == "success").then_some(v)
    }

    /// Instances for which `alert` is in state `state` now.
    fn alerting(&self, alert: &str, state: &str) -> Vec<String> {
        let Some(v) = self.get("/api/v1/alerts") else {
            return vec!["<no answer>".into()];
        };
        v["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["labels"]["alertname"] == alert && a["state"] == state)
            .map(|a| {
                a["labels"]["instance"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    }

    /// `(instance, value)` of an instant query.
    fn query(&self, q: &str) -> Vec<(String, f64)> {
        let Some(v) = self.get(&format!("/api/v1/query?query={q}")) else {
            return vec![];
        };
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["metric"]["instance"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    r["value"][1].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect()
    }
}

fn wait(p: &Prometheus, timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}\nprometheus log:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn prometheus_fires_datapath_down_while_a_datapath_is_dead_and_clears_it_after() {
    veilnet_test_support::require_root!();
    let started = Instant::now();
    let lab = Lab::up("prom", &["--nodes", "2"]);
    // The control-plane namespace reaches every agent's metrics on its node address.
    let cp = lab.control_plane_netns();
    for target in NODES {
        let reached = veilnet::netns::run_in(&cp, move || {
            std::net::TcpStream::connect_timeout(&target.parse().unwrap(), Duration::from_secs(2))
                .is_ok()
        })
        .unwrap();
        assert!(reached, "{cp} cannot reach {target}");
    }
    let prom = Prometheus::start(&lab);

    wait(
        &prom,
        Duration::from_secs(30),
        "both agents scraped and up",
        || {
            let up = prom.query("up");
            up.len() == 2 && up.iter().all(|(_, v)| *v == 1.0)
        },
    );
    wait(
        &prom,
        Duration::from_secs(20),
        "veilnet_datapath_up 1 on both nodes",
        || {
            let dp = prom.query("veilnet_datapath_up");
            dp.len() == 2 && dp.iter().all(|(_, v)| *v == 1.0)
        },
    );
    assert!(prom.alerting("VeilnetDatapathDown", "firing").is_empty());

    // What real agents export is what the dashboard test checks queries against.
    let exported = veilnet::agent::metrics::exported_names();
    let names = prom.get("/api/v1/label/__name__/values").unwrap();
    let scraped: Vec<&str> = names["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .filter(|n| n.starts_with("veilnet_"))
        .collect();
    for n in [
        "veilnet_datapath_up",
        "veilnet_node_info",
        "veilnet_peer_path",
    ] {
        assert!(scraped.contains(&n), "{n} not scraped: {scraped:?}");
    }
    let unlisted: Vec<_> = scraped.iter().filter(|n| !exported.contains(**n)).collect();
    assert!(
        unlisted.is_empty(),
        "agents export names metrics::exported_names() lacks: {unlisted:?}"
    );

    // Kill node-1's datapath: its alert fires, node-2's does not.
    lab.kill_daemon("datapath-node-1");
    let killed = Instant::now();
    wait(
        &prom,
        Duration::from_secs(30),
        "VeilnetDatapathDown firing for node-1",
        || prom.alerting("VeilnetDatapathDown", "firing") == [NODES[0]],
    );
    eprintln!(
        "datapath down fired {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );
    assert!(
        !prom
            .alerting("VeilnetDatapathDown", "pending")
            .contains(&NODES[1].to_string()),
        "node-2's datapath is alive"
    );

    // Start it again (`lab up` restarts a daemon that died): the alert clears.
    lab.up_again();
    let restarted = Instant::now();
    wait(
        &prom,
        Duration::from_secs(30),
        "VeilnetDatapathDown cleared",
        || {
            prom.alerting("VeilnetDatapathDown", "firing").is_empty()
                && prom.alerting("VeilnetDatapathDown", "pending").is_empty()
        },
    );
    eprintln!(
        "cleared {:.1} s after the restart",
        restarted.elapsed().as_secs_f64()
    );
    // The restart is seen as one.
    wait(
        &prom,
        Duration::from_secs(20),
        "VeilnetDatapathRestarted for node-1",
        || prom.alerting("VeilnetDatapathRestarted", "firing") == [NODES[0]],
    );
    eprintln!("whole test: {:.1} s", started.elapsed().as_secs_f64());
}
