//! Helpers for the root integration tests: throwaway named network namespaces (RAII) and a
//! runner for the built plugin binary inside a "node" namespace.
//!
//! The root crate's `src/netns.rs` has similar helpers, but this crate cannot depend on the root
//! crate (the root crate depends on this one), so the few lines needed live here.

#![allow(dead_code)] // each test file uses a different subset

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_veilnet-cni");

/// True when the tests may create namespaces. Root tests print a notice and pass otherwise.
pub fn is_root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("skipping: needs root to create network namespaces");
    }
    root
}

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A named network namespace, deleted on drop (also when the test panics).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("veilcni-{}-{n}-{tag}", std::process::id());
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    pub fn path_str(&self) -> String {
        self.path().to_string_lossy().into_owned()
    }

    /// `ip -n <ns> <args>`, panicking on failure; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        String::from_utf8(run("ip", &full).stdout).unwrap()
    }

    /// `ip -j -n <ns> <args>` parsed.
    pub fn ip_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["-j", "-n", self.name.as_str()];
        full.extend_from_slice(args);
        let out = Command::new("ip").args(&full).output().unwrap();
        if !out.status.success() {
            return Value::Array(vec![]);
        }
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]))
    }

    /// Names of the links in this namespace.
    pub fn links(&self) -> Vec<String> {
        self.ip_json(&["link", "show"])
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_string())
            .collect()
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .unwrap()
    }

    pub fn delete(&self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.delete();
    }
}

/// One invocation of the plugin.
pub struct Call<'a> {
    pub node: &'a Netns,
    pub env: Vec<(String, String)>,
    pub stdin: String,
}

impl<'a> Call<'a> {
    pub fn new(node: &'a Netns, command: &str, stdin: &Value) -> Call<'a> {
        Call {
            node,
            env: vec![
                ("CNI_COMMAND".into(), command.into()),
                ("CNI_PATH".into(), "/opt/cni/bin".into()),
            ],
            stdin: stdin.to_string(),
        }
    }

    /// ADD/CHECK/DEL environment for an attachment.
    pub fn attachment(mut self, container_id: &str, ifname: &str, netns: &str) -> Call<'a> {
        self.env
            .push(("CNI_CONTAINERID".into(), container_id.into()));
        self.env.push(("CNI_IFNAME".into(), ifname.into()));
        if !netns.is_empty() {
            self.env.push(("CNI_NETNS".into(), netns.into()));
        }
        self
    }

    pub fn without(mut self, var: &str) -> Call<'a> {
        self.env.retain(|(k, _)| k != var);
        self
    }

    /// Starts the binary with its network namespace set to the node's before exec.
    pub fn spawn(&self) -> Child {
        let ns = File::open(self.node.path()).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: setns(2) is async-signal-safe and only reads the fd `ns` keeps open.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(self.stdin.as_bytes())
            .unwrap();
        child
    }

    pub fn run(&self) -> Reply {
        Reply::from(self.spawn().wait_with_output().unwrap())
    }
}

/// What the plugin answered.
#[derive(Debug)]
pub struct Reply {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Reply {
    fn from(out: Output) -> Reply {
        Reply {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// Asserts success and returns the result JSON (or Null for empty output).
    pub fn ok(&self) -> Value {
        assert_eq!(self.code, 0, "plugin failed: {self:?}");
        if self.stdout.trim().is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }

    /// Asserts an error result with `code` and returns it.
    pub fn err(&self, code: u64) -> Value {
        assert_ne!(self.code, 0, "plugin succeeded unexpectedly: {self:?}");
        let v = self.json();
        assert_eq!(v["code"], code, "{self:?}");
        for key in ["cniVersion", "msg", "details"] {
            assert!(v[key].is_string(), "error result lacks {key}: {self:?}");
        }
        v
    }
}

/// A standalone-mode network configuration.
pub fn standalone_conf(state_dir: &std::path::Path, subnet: &str) -> Value {
    serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "itest",
        "type": "veilnet-cni",
        "subnet": subnet,
        "stateDir": state_dir,
    })
}

/// IPAM record files (named by address) of the network.
pub fn ipam_records(state_dir: &std::path::Path, network: &str) -> Vec<String> {
    let dir = state_dir.join("ipam").join(network);
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
