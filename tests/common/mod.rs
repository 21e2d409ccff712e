//! Helpers for the netns integration tests: a lab guard that always tears down, the veilnet binary,
//! and a snapshot of the root namespace to prove it is untouched.
#![allow(dead_code)]

use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub fn veilnet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_veilnet"))
}

/// Runs a command and returns its output; panics with stdout+stderr when it fails.
pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How long [`Lab::exec`] lets a command in a pod run.
pub const EXEC_LIMIT: Duration = Duration::from_secs(300);

/// `cmd`'s output, the process killed (SIGKILL) if it runs past `limit`; a killed one's stderr
/// ends with a line naming the limit.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    use std::process::Stdio;
    use std::sync::mpsc;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (done, finished) = mpsc::channel::<()>();
    // The main thread tells the watchdog once the child is reaped; a pid reused in between
    // would need that microsecond window to meet the end of a limit of seconds.
    let watchdog = std::thread::spawn(move || {
        if finished.recv_timeout(limit).is_err() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            return true;
        }
        false
    });
    let mut out = child.wait_with_output().expect("wait for the command");
    let _ = done.send(());
    if watchdog.join().unwrap_or(false) {
        out.stderr.extend_from_slice(
            format!("\n(killed: still running after {} s)\n", limit.as_secs()).as_bytes(),
        );
    }
    out
}

pub fn text(out: &Output) -> String {
    format!(
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Lab tests start with `veilnet_test_support::require_root!()`, which skips them (with a printed
/// reason) without root; [`Lab::up`] checks again, so a test that forgot fails loudly instead.
fn assert_root() {
    assert!(
        veilnet_test_support::is_root(),
        "the lab needs root: start the test with veilnet_test_support::require_root!()"
    );
}

/// A unique lab name per test, so tests can run in parallel: `vt<pid><n>`.
pub fn unique_name(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let name = format!("vt{}{}{}", tag, std::process::id() % 100_000, n);
    name.chars().take(24).collect()
}

/// Which control plane a lab test runs on (`veilnet lab up --control-plane`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlPlane {
    StandIn,
    Kubernetes,
}

impl ControlPlane {
    pub fn flag(self) -> &'static str {
        match self {
            ControlPlane::StandIn => "stand-in",
            ControlPlane::Kubernetes => "kubernetes",
        }
    }
}

/// Why the real control plane cannot run here (its binaries are not built), if it cannot.
pub fn kubernetes_unavailable() -> Option<String> {
    veilnet_lab::control_plane::kubernetes::bin_dir()
        .err()
        .map(|e| e.to_string())
}

/// Skips the test (with the reason printed) when the real control plane is not built.
#[macro_export]
macro_rules! require_kubernetes {
    () => {
        if let Some(why) = $crate::common::kubernetes_unavailable() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

/// A lab daemon's memory, KiB: VmRSS and, of it, RssAnon (heap and stacks). VmRSS also counts
/// the binary's file pages, which grow as code paths are first run (a debug build's text is
/// large) and are not a leak; RssAnon is what a leak would grow.
#[derive(Debug, Clone, Copy)]
pub struct DaemonMemory {
    pub rss: u64,
    pub anon: u64,
}

/// A lab that is torn down when the guard drops, whether the test passed or panicked.
pub struct Lab {
    pub name: String,
    /// The `lab up` arguments it was made with, for [`Lab::up_again`].
    up_args: Vec<String>,
}

impl Lab {
    /// `veilnet lab up --name <unique> --control-plane PLANE ARGS`.
    pub fn up_on(plane: ControlPlane, tag: &str, args: &[&str]) -> Lab {
        let mut full = vec!["--control-plane", plane.flag()];
        full.extend_from_slice(args);
        Lab::up(tag, &full)
    }

    /// `veilnet lab up --name <unique> ARGS`; panics (after tearing down) if it fails. Without a
    /// `--control-plane` in ARGS, `$VEILNET_LAB_CONTROL_PLANE` (`stand-in` or `kubernetes`, read
    /// by `veilnet lab up` itself) picks it, so a whole suite can run on the real control plane.
    pub fn up(tag: &str, args: &[&str]) -> Lab {
        assert_root();
        let lab = Lab {
            name: unique_name(tag),
            up_args: args.iter().map(|a| a.to_string()).collect(),
        };
        let out = veilnet()
            .args(["lab", "up", "--name", &lab.name])
            .args(args)
            .output()
            .expect("spawn veilnet lab up");
        assert!(
            out.status.success(),
            "lab up failed:\n{}\n{}",
            text(&out),
            lab.logs()
        );
        lab
    }

    /// `veilnet lab up` again with the arguments the lab was made with: starts what is not
    /// running (a killed daemon, a stopped API server) and leaves the rest alone.
    pub fn up_again(&self) -> String {
        ok(veilnet()
            .args(["lab", "up", "--name", &self.name])
            .args(&self.up_args))
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        veilnet()
            .args(["lab", "kubectl", "--name", &self.name, "--"])
            .args(args)
            .output()
            .expect("spawn kubectl")
    }

    /// kubectl that must succeed; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed:\n{}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn kubectl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = args.to_vec();
        full.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl_ok(&full)).expect("kubectl json")
    }

    /// Applies a manifest given as text.
    pub fn apply(&self, manifest: &str) {
        use std::io::Write;
        let mut child = veilnet()
            .args([
                "lab", "kubectl", "--name", &self.name, "--", "apply", "-f", "-",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn kubectl apply");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(manifest.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "apply failed:\n{}", text(&out));
    }

    /// Runs `cmd` in the pod's network namespace, killed after [`EXEC_LIMIT`]: a probe that
    /// waits forever (iperf3 on a lost control connection does) must fail its test, not hang CI.
    pub fn exec(&self, pod: &str, cmd: &[&str]) -> Output {
        self.exec_within(pod, cmd, EXEC_LIMIT)
    }

    /// [`Lab::exec`] with its own limit. `lab exec` execs the command in place, so killing the
    /// process kills the command. A killed command's output ends with a line saying so.
    pub fn exec_within(&self, pod: &str, cmd: &[&str], limit: Duration) -> Output {
        let mut command = veilnet();
        command
            .args(["lab", "exec", "--name", &self.name, pod, "--"])
            .args(cmd);
        output_within(&mut command, limit)
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = ok(veilnet().args(["lab", "status", "--name", &self.name, "--json"]));
        serde_json::from_str(&out).expect("status json")
    }

    /// The control plane this lab runs (`lab status`'s `controlPlane`).
    pub fn control_plane(&self) -> ControlPlane {
        match self.status_json()["controlPlane"].as_str() {
            Some("kubernetes") => ControlPlane::Kubernetes,
            Some("stand-in") => ControlPlane::StandIn,
            other => panic!("lab status has an unknown controlPlane {other:?}"),
        }
    }

    /// Runs `veilnet lab agnhost dns-serve --listen ADDR` as a hostNetwork pod `default/node-dns`
    /// on `node` (a node-local resolver at one of the node's addresses).
    pub fn host_dns_server(&self, node: &str, listen: &str) {
        let command = ["veilnet", "lab", "agnhost", "dns-serve", "--listen", listen];
        let mut dns: serde_json::Value =
            serde_json::from_str(&pod_manifest("default", "node-dns", node, &[], &command))
                .expect("a pod manifest");
        dns["spec"]["hostNetwork"] = true.into();
        self.apply(&dns.to_string());
    }

    /// Waits until the pod is Running with an IP; returns the IP.
    pub fn wait_pod_ip(&self, ns_name: &str, timeout: Duration) -> String {
        let (ns, name) = ns_name.split_once('/').unwrap_or(("default", ns_name));
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.kubectl(&["get", "pod", "-n", ns, name, "-o", "json"]);
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                let phase = v["status"]["phase"].as_str().unwrap_or("");
                if let (Some(ip), "Running") = (v["status"]["podIP"].as_str(), phase) {
                    return ip.to_string();
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "pod {ns_name} not Running with an IP after {timeout:?}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The tail of every log of the lab, for failure messages.
    pub fn logs(&self) -> String {
        let dir = std::path::Path::new("/var/lib/veilnet-lab")
            .join(&self.name)
            .join("logs");
        let mut all = String::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                all.push_str(&format!("=== {}\n", e.path().display()));
                for l in tail.into_iter().rev() {
                    all.push_str(l);
                    all.push('\n');
                }
            }
        }
        all
    }

    pub fn down(&self) {
        let _ = veilnet()
            .args(["lab", "down", "--name", &self.name])
            .output();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The lab's logs vanish with it: show them with the failure.
            eprintln!("lab {} logs at the failure:\n{}", self.name, self.logs());
        }
        self.down();
    }
}

/// The root namespace's links, addresses, routes, neighbours and nft ruleset, as text.
pub fn root_netns_snapshot() -> String {
    let mut s = String::new();
    for args in [
        vec!["-o", "link", "show"],
        vec!["-o", "addr", "show"],
        vec!["route", "show", "table", "all"],
        vec!["-6", "route", "show", "table", "all"],
    ] {
        let out = Command::new("ip").args(&args).output().expect("ip");
        s.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    if let Ok(out) = Command::new("nft").args(["list", "ruleset"]).output() {
        s.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    s
}

/// Namespaces whose name starts with `<lab>.`.
pub fn lab_netns(name: &str) -> Vec<String> {
    let prefix = format!("{name}.");
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Processes whose command line mentions the lab (daemons carry `--lab-role` and the lab paths).
pub fn lab_processes(name: &str) -> Vec<i32> {
    let needle = format!("/veilnet-lab/{name}/");
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

/// A pod manifest pinned to `node`, running `command` (the lab kubelet ignores the image).
pub fn pod_manifest(
    ns: &str,
    name: &str,
    node: &str,
    labels: &[(&str, &str)],
    command: &[&str],
) -> String {
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "c", "image": "veilnet/agnhost", "command": command}],
        }
    })
    .to_string()
}

/// The agnhost server command used by most tests: TCP 80,81 and UDP 80,81.
pub const SERVE: &[&str] = &[
    "veilnet", "lab", "agnhost", "serve", "--tcp", "80,81", "--udp", "80,81",
];

impl Lab {
    /// `client` → `server_ip`:5201 TCP throughput in Mbit/s over 4 s (the first second omitted),
    /// as the server received it. Panics if iperf3 fails.
    pub fn iperf3_mbps(&self, client: &str, server_ip: &str) -> f64 {
        self.try_iperf3_mbps(client, server_ip)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Lab::iperf3_mbps`], with iperf3's failure (it can exit 0 with an `error` in its JSON and
    /// no totals) as an error.
    pub fn try_iperf3_mbps(&self, client: &str, server_ip: &str) -> Result<f64, String> {
        let out = self.exec_within(
            client,
            &[
                "iperf3",
                "-c",
                server_ip,
                "-t",
                "4",
                "-O",
                "1",
                "--json",
                "--connect-timeout",
                "5000",
            ],
            // 4 s of test; iperf3 waits forever for results on a control connection that a
            // fault broke.
            Duration::from_secs(30),
        );
        iperf3_received_mbps(&out)
    }

    /// Probes `target` from `pod` with agnhost connect; returns the exit code.
    pub fn connect(&self, pod: &str, target: &str, proto: &str, timeout: &str) -> Option<i32> {
        self.connect_output(pod, target, proto, timeout)
            .status
            .code()
    }

    /// [`Lab::connect`] with the whole output (agnhost prints the server's answer).
    pub fn connect_output(&self, pod: &str, target: &str, proto: &str, timeout: &str) -> Output {
        self.exec(
            pod,
            &[
                "veilnet",
                "lab",
                "agnhost",
                "connect",
                target,
                "--protocol",
                proto,
                "--timeout",
                timeout,
            ],
        )
    }

    /// The pid of one of the lab's daemons (`apiserver`, `kubelet-node-1`, `agent-node-2` …).
    pub fn daemon_pid(&self, role: &str) -> Option<i32> {
        let text = std::fs::read_to_string(format!(
            "/var/lib/veilnet-lab/{}/pids/{role}.pid",
            self.name
        ))
        .ok()?;
        // The first line; a foreign program's pid file (etcd, kube-apiserver, …) names the
        // program on a second.
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        std::path::Path::new(&format!("/proc/{pid}"))
            .exists()
            .then_some(pid)
    }

    /// A running daemon's memory from `/proc/PID/status`, KiB.
    pub fn daemon_memory(&self, role: &str) -> DaemonMemory {
        let pid = self
            .daemon_pid(role)
            .unwrap_or_else(|| panic!("{role} is not running"));
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("{role} (pid {pid}): /proc status: {e}"));
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        DaemonMemory {
            rss: field("VmRSS:"),
            anon: field("RssAnon:"),
        }
    }

    /// Kills one daemon (SIGKILL, as a crash would) and waits for it to be gone.
    pub fn kill_daemon(&self, role: &str) {
        let pid = self
            .daemon_pid(role)
            .unwrap_or_else(|| panic!("{role} is not running"));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while !exited(pid) {
            assert!(Instant::now() < deadline, "{role} did not die");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A node's agent log as written so far (`logs/agent-<node>.log`). It must be plain text:
    /// the daemons colour their logs only on a terminal, so grepping `kind=Node` works.
    pub fn agent_log(&self, node: &str) -> String {
        self.daemon_log(&format!("agent-{node}"))
    }

    /// One daemon's log as written so far (`logs/<role>.log`: `agent-node-1`, `datapath-node-2`
    /// …), checked to be plain text like [`Lab::agent_log`].
    pub fn daemon_log(&self, role: &str) -> String {
        let path = std::path::Path::new("/var/lib/veilnet-lab")
            .join(&self.name)
            .join("logs")
            .join(format!("{role}.log"));
        let log =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            !log.contains('\x1b'),
            "{} has terminal colour escapes",
            path.display()
        );
        log
    }

    /// One annotation of a Node ("" when absent).
    pub fn annotation(&self, node: &str, key: &str) -> String {
        self.kubectl_json(&["get", "node", node])["metadata"]["annotations"][key]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub fn node_netns(&self, index: usize) -> String {
        format!("{}.n{index}", self.name)
    }

    /// The control plane's namespace (API server, etcd, controllers).
    pub fn control_plane_netns(&self) -> String {
        format!("{}.cp", self.name)
    }

    /// The underlay's namespace: the switch (bridge `br0`) every node's `eth0` is plugged into.
    pub fn underlay_netns(&self) -> String {
        format!("{}.ul", self.name)
    }

    /// `ip -n <node netns> ARGS` output.
    pub fn ip(&self, node: usize, args: &[&str]) -> String {
        let ns = self.node_netns(node);
        let mut full = vec!["-n", ns.as_str()];
        full.extend_from_slice(args);
        ok(Command::new("ip").args(&full))
    }
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---- NetworkPolicy helpers (tests/lab_netpol.rs) ----

impl Lab {
    /// The network namespace of a running pod (`ns/pod`), from `lab status --json`.
    pub fn pod_netns(&self, ns_name: &str) -> String {
        let status = self.status_json();
        status["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| {
                format!(
                    "{}/{}",
                    p["namespace"].as_str().unwrap_or(""),
                    p["name"].as_str().unwrap_or("")
                ) == ns_name
            })
            .and_then(|p| p["netns"].as_str())
            .unwrap_or_else(|| panic!("pod {ns_name} has no netns in lab status"))
            .to_string()
    }

    /// A node's run directory (agent socket, policy status, flow log).
    pub fn run_dir(&self, node: usize) -> std::path::PathBuf {
        std::path::Path::new("/var/lib/veilnet-lab")
            .join(&self.name)
            .join(format!("nodes/node-{node}/run"))
    }

    /// A node's `policy-status.json`.
    pub fn policy_status(&self, node: usize) -> serde_json::Value {
        std::fs::read(self.run_dir(node).join("policy-status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// GET http://<ip>:<port><path> from inside node `node`'s namespace; (status code, body).
    pub fn http_get(&self, node: usize, ip: &str, port: u16, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let (ip, path) = (ip.to_string(), path.to_string());
        veilnet::netns::run_in(&self.node_netns(node), move || {
            let mut s =
                std::net::TcpStream::connect((ip.as_str(), port)).expect("connect to the agent");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut raw = String::new();
            s.read_to_string(&mut raw).unwrap();
            let code = raw
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let body = raw
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            (code, body)
        })
        .expect("run in the node namespace")
    }

    /// A node's flow log lines, parsed.
    pub fn flow_log(&self, node: usize) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.run_dir(node).join("flows.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// The value of the first metric line of `body` starting with `prefix`.
pub fn metric(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// `veilnet lab agnhost connect` run directly inside a pod's netns (cheaper than `lab exec`, same
/// probe). Returns the exit code (0 answered, 1 timed out, 2 refused, 3 error).
pub fn probe_in(netns: &str, target: &str, proto: &str, timeout: &str) -> Option<i32> {
    let mut cmd = veilnet();
    cmd.args([
        "lab",
        "agnhost",
        "connect",
        target,
        "--protocol",
        proto,
        "--timeout",
        timeout,
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    veilnet::netns::command_in(netns, &mut cmd).expect("enter pod netns");
    cmd.status().expect("spawn probe").code()
}

/// Runs `f` over `jobs` on `threads` threads, collecting the results in job order.
pub fn par_map<T: Sync, R: Send>(jobs: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<R>>> =
        jobs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(job) = jobs.get(i) else { break };
                let r = f(job);
                *results[i].lock().unwrap() = Some(r);
            });
        }
    });
    results
        .into_iter()
        .map(|m| m.into_inner().unwrap().expect("every job ran"))
        .collect()
}

// ---- Encryption helpers (tests/lab_encryption.rs, tests/lab_vxlan_injection.rs) ----

/// `veilnet status --json` of one lab node.
pub fn node_status(lab: &Lab, node: &str) -> serde_json::Value {
    let out = ok(veilnet().args(["status", "--lab", &lab.name, "--node", node, "--json"]));
    serde_json::from_str(&out).unwrap()
}

pub fn path_to(lab: &Lab, node: &str, peer: &str) -> String {
    let st = node_status(lab, node);
    st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == peer)
        .map(|p| p["path"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

pub fn wait_path(lab: &Lab, node: &str, peer: &str, want: &str, within: Duration) -> Duration {
    let started = Instant::now();
    eventually(within, &format!("{node} -> {peer} path {want}"), || {
        path_to(lab, node, peer) == want
    });
    started.elapsed()
}

/// Labels a node with an encryption mode.
pub fn set_mode(lab: &Lab, node: &str, mode: &str) {
    lab.kubectl_ok(&[
        "label",
        "node",
        node,
        &format!("veilnet.io/encryption={mode}"),
        "--overwrite",
    ]);
}

/// Runs scripts/verify-ciphertext.sh against the lab (ends are `NS/POD` or `node:NODE`).
pub fn verify(lab: &Lab, from: &str, to: &str, expect: &str) -> Output {
    Command::new("./scripts/verify-ciphertext.sh")
        .args(["--lab", &lab.name, from, to, expect])
        .env("VEILNET", env!("CARGO_BIN_EXE_veilnet"))
        .output()
        .expect("run verify-ciphertext.sh")
}

pub fn assert_wire(lab: &Lab, from: &str, to: &str, expect: &str) {
    let out = verify(lab, from, to, expect);
    assert!(
        out.status.success(),
        "expected {expect} on the wire:\n{}\n{}",
        text(&out),
        lab.logs()
    );
}

/// Writes the addresses the cluster records for a Node (what its kubelet would write).
pub fn record_address(lab: &Lab, node: &str, ip: &str) {
    let patch =
        serde_json::json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}});
    lab.kubectl_ok(&[
        "patch",
        "node",
        node,
        "--subresource=status",
        "--type=merge",
        "-p",
        &patch.to_string(),
    ]);
}

/// The Internet checksum (RFC 1071) of `data`, for crafted IPv4 and ICMP headers.
pub fn inet_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether `pid` has finished exiting, sockets closed. An empty cmdline is not enough: the kernel
/// drops the memory map (and so the cmdline) before it closes the files, and a multi-threaded
/// leader turns zombie while its other threads still hold the descriptors. Gone, or a zombie
/// with no thread left but itself, is.
fn exited(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // The state follows the parenthesised command name, which may itself hold spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0);
    matches!(state, Some("Z") | Some("X") | None) && threads <= 1
}

/// A tiny deterministic generator (xorshift64) for tests that draw kill points or flood
/// contents: reproducible from its seed, no quality needed. `seed` must not be 0.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Mbit/s received, from the output of `iperf3 … --json`; iperf3's failure (it can exit 0 with
/// an `error` in its JSON and no totals) is an error.
pub fn iperf3_received_mbps(out: &Output) -> Result<f64, String> {
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("iperf3 printed no JSON ({e}): {}", text(out)))?;
    match report["end"]["sum_received"]["bits_per_second"].as_f64() {
        Some(bps) if out.status.success() => Ok(bps / 1e6),
        _ => Err(format!(
            "iperf3 failed ({}): {}",
            out.status,
            report["error"]
                .as_str()
                .unwrap_or("no totals in its report")
        )),
    }
}

// ---- Kernel state snapshots (tests/lab_faults_agent.rs, tests/lab_soak.rs) ----

/// Everything of a node's dataplane the agent owns, as the kernel holds it. The bridge's MTU
/// follows its first pod port until the agent's periodic pass sets it (see `lab_kubernetes`),
/// and nft counters count traffic: both are left out.
pub fn node_kernel_state(lab: &Lab, node: usize) -> String {
    let netns = lab.node_netns(node);
    let ip = |args: &[&str]| {
        lab.ip(node, args)
            .lines()
            .map(|l| match l.find(": veilbr0: ") {
                Some(_) => l.split(" mtu ").next().unwrap_or(l).to_string(),
                None => without_timers(l),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let bridge_fdb = text(
        &std::process::Command::new("ip")
            .args(["netns", "exec", &netns, "bridge", "fdb", "show"])
            .output()
            .expect("bridge fdb"),
    );
    // Learned entries come and go with traffic; the agent writes the static and permanent ones.
    let mut fdb: Vec<&str> = bridge_fdb
        .lines()
        .filter(|l| (l.contains("permanent") || l.contains("static")) && !l.contains(" master "))
        .collect();
    // Neighbour and FDB entries are sets the kernel lists in hash order, which a resize of the
    // table (many pods' ARP entries at once) changes: a 60-minute soak listed node-2's two
    // permanent neighbours in the other order at its end. Compare them sorted.
    fdb.sort_unstable();
    let permanent_neighbours = ip(&["neigh", "show", "nud", "permanent"]);
    let mut neighbours: Vec<&str> = permanent_neighbours.lines().collect();
    neighbours.sort_unstable();
    let nft = text(
        &std::process::Command::new("ip")
            .args(["netns", "exec", &netns, "nft", "-s", "list", "ruleset"])
            .output()
            .expect("nft"),
    );
    // Tables, and the chains, sets and counters in them, are listed in creation order: an agent
    // that replaced a table whole (in one transaction) lists them in another order than one that
    // added them one by one. Rules keep their order (it is their meaning); blocks are sorted.
    let nft = sorted_blocks(&nft, "table ", "}")
        .iter()
        .map(|table| {
            let mut lines = table.lines();
            let head = lines.next().unwrap_or_default();
            let body: Vec<&str> = lines.collect();
            let body = body.join("\n");
            format!("{head}\n{}", sorted_blocks(&body, "\t", "\t}").concat())
        })
        .collect::<String>();
    [
        ip(&["-d", "link"]),
        ip(&["-4", "addr"]),
        // Every table: the agent also keeps routes in its pod-to-node table, chosen by a rule.
        ip(&["route", "show", "table", "all"]),
        ip(&["rule"]),
        neighbours.join("\n"),
        fdb.join("\n"),
        nft,
    ]
    .join("\n---\n")
}

/// `text` cut into blocks, each from a line that starts with `open` (and is not `close`) to the
/// next line equal to `close`, sorted; lines outside blocks are blocks of their own.
pub fn sorted_blocks(text: &str, open: &str, close: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match current.as_mut() {
            Some(block) => {
                block.push_str(line);
                block.push('\n');
                if line == close {
                    blocks.push(current.take().unwrap());
                }
            }
            None if line.starts_with(open) && line != close && line.ends_with('{') => {
                current = Some(format!("{line}\n"));
            }
            None => blocks.push(format!("{line}\n")),
        }
    }
    blocks.extend(current);
    blocks.sort();
    blocks
}

/// `line` without the bridge's running timers (`-d` prints `gc_timer  292.11` and the like).
pub fn without_timers(line: &str) -> String {
    let mut out = Vec::new();
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w.ends_with("_timer") {
            words.next();
        } else {
            out.push(w);
        }
    }
    out.join(" ")
}

/// `snapshot()` once it holds still: the same twice, `every` apart, within `within`.
pub fn settled<T: PartialEq>(
    what: &str,
    every: Duration,
    within: Duration,
    mut snapshot: impl FnMut() -> T,
) -> T {
    let deadline = Instant::now() + within;
    let mut last = snapshot();
    loop {
        std::thread::sleep(every);
        let now = snapshot();
        if now == last {
            return now;
        }
        assert!(Instant::now() < deadline, "{what} never settled");
        last = now;
    }
}

/// [`node_kernel_state`] once it holds still (the same twice, a second apart), within 60 s.
pub fn settled_kernel_state(lab: &Lab, node: usize) -> String {
    settled(
        &format!("node-{node}'s kernel state"),
        Duration::from_secs(1),
        Duration::from_secs(60),
        || node_kernel_state(lab, node),
    )
}

/// `diff -u` of the two states (order matters: nft rules run in order).
pub fn kernel_state_diff(want: &str, got: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let (w, g) = (dir.path().join("want"), dir.path().join("got"));
    std::fs::write(&w, want).unwrap();
    std::fs::write(&g, got).unwrap();
    text(
        &std::process::Command::new("diff")
            .arg("-u")
            .args([&w, &g])
            .output()
            .expect("diff"),
    )
}

// ---- Packet capture ----

/// Counts packets matching tcpdump `args` (options, then a filter) on eth0 of `netns` while
/// `send` runs.
pub fn tcpdump_count(netns: &str, args: &[&str], send: impl FnOnce()) -> usize {
    let mut cmd = Command::new("tcpdump");
    // --immediate-mode: else packets wait in a capture block that is lost when tcpdump stops.
    cmd.args(["--immediate-mode", "-ni", "eth0", "-w", "/dev/null"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    veilnet::netns::command_in(netns, &mut cmd).unwrap();
    let mut child = cmd.spawn().unwrap();
    // tcpdump says "listening on" once its capture is open; a fixed sleep would race it on a
    // busy machine (and a count of 0 would then prove nothing).
    let stderr = child.stderr.take().unwrap();
    let (listening_tx, listening_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut said = Vec::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("listening on") {
                let _ = listening_tx.send(());
            }
            said.push(line);
        }
        said.join("\n")
    });
    let opened = listening_rx.recv_timeout(Duration::from_secs(10)).is_ok();
    if opened {
        send();
        std::thread::sleep(Duration::from_millis(1500));
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    child.wait().unwrap();
    let text = reader.join().unwrap();
    assert!(
        opened,
        "tcpdump did not start capturing within 10 s: {text}"
    );
    text.lines()
        .find_map(|l| {
            l.strip_suffix(" packets captured")
                .or(l.strip_suffix(" packet captured"))
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("tcpdump said: {text}"))
}

// ---- Node state on disk, and the datapath's rotation log ----

/// The addresses node `node`'s IPAM store holds (files named by address under some `ipam/`
/// directory of the node's state).
pub fn ipam_addresses(lab: &Lab, node: usize) -> std::collections::BTreeSet<std::net::IpAddr> {
    fn walk(
        dir: &std::path::Path,
        under_ipam: bool,
        out: &mut std::collections::BTreeSet<std::net::IpAddr>,
    ) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                walk(&path, under_ipam || name == "ipam", out);
            } else if let (true, Ok(ip)) = (under_ipam, name.parse()) {
                out.insert(ip);
            }
        }
    }
    let mut out = std::collections::BTreeSet::new();
    walk(
        &std::path::Path::new("/var/lib/veilnet-lab")
            .join(&lab.name)
            .join(format!("nodes/node-{node}")),
        false,
        &mut out,
    );
    out
}

/// How many times node `node`'s datapath has moved a peer to the session of a new key.
pub fn rotation_switches(lab: &Lab, node: &str) -> usize {
    lab.daemon_log(&format!("datapath-{node}"))
        .matches("wireguard key rotation: switched to the new session")
        .count()
}
