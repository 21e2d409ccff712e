//! Helpers for the root integration tests: a runner for the built plugin binary inside a "node"
//! namespace, and JSON views of `ip`. The namespaces themselves (deleted on drop) and the root
//! check come from the shared `veilnet-test-support` crate.

#![allow(dead_code)] // each test file uses a different subset

use std::io::Write;
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;
pub use veilnet_test_support::require_root;
use veilnet_test_support::Netns as SharedNetns;

pub const BIN: &str = env!("CARGO_BIN_EXE_veilnet-cni");

/// A throwaway namespace named `veilcni-<pid>-<n>-<tag>`.
pub struct Netns(SharedNetns);

impl Netns {
    pub fn new(tag: &str) -> Netns {
        Netns(SharedNetns::new("veilcni", tag))
    }

    /// `ip -j -n <ns> <args>` parsed (an empty array when it fails).
    pub fn ip_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["-j", "-n", self.name()];
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
}

impl std::ops::Deref for Netns {
    type Target = SharedNetns;

    fn deref(&self) -> &SharedNetns {
        &self.0
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

    /// Starts the binary inside the node's network namespace, with only the CNI environment.
    pub fn spawn(&self) -> Child {
        let mut cmd = self.node.command(BIN);
        cmd.env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
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
