//! Shared helpers for veilnet's root integration tests (the root crate's `tests/` and
//! `cni/tests/`): the root check, which skips a test with a printed reason when it runs without
//! root, and throwaway named network namespaces that are deleted on drop, even when the test
//! panics.
//!
//! A dependency of both test suites, so it depends on neither crate (the root crate depends on
//! the CNI crate): namespaces are made with iproute2, exactly as `ip netns` does.
//!
//! ```no_run
//! use veilnet_test_support::{require_root, Netns};
//!
//! #[test]
//! fn pods_talk() {
//!     require_root!();
//!     let node = Netns::new("veilex", "node");
//!     node.ip(&["link", "add", "br0", "type", "bridge"]);
//! } // `node` is deleted here, with anything still running inside it.
//! ```

#![forbid(unsafe_code)]

use std::io::Write;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Where iproute2 keeps named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// True when the effective user is root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The running test's name: libtest runs each test on a thread named after it.
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .unwrap_or("this test")
        .to_string()
}

/// True when `test` may run: we are root. Otherwise prints why it is skipped, to the real
/// stderr (not libtest's capture, so the line shows for a passing test too), and returns false:
/// the test then returns early and passes.
pub fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    let _ = writeln!(
        std::io::stderr(),
        "skipped: {test} needs root (network namespaces)"
    );
    false
}

/// Returns from the calling test, which passes, after printing
/// `skipped: <test> needs root (network namespaces)` when not running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::root_or_skip(&$crate::current_test()) {
            return;
        }
    };
}

/// A name no other test (in this or a parallel test binary) uses: `<prefix>-<pid>-<n>-<tag>`.
pub fn unique_name(prefix: &str, tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let name = format!("{prefix}-{}-{n}", std::process::id());
    if tag.is_empty() {
        name
    } else {
        format!("{name}-{tag}")
    }
}

/// Runs `program` to completion; panics with its stderr when it cannot start or fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

/// A uniquely named network namespace (`/run/netns/<name>`, loopback up), deleted on drop
/// together with every process still inside it, also when the test panics.
///
/// Derefs to its name, so it goes wherever a namespace name (`&str`) is expected.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `<prefix>-<pid>-<n>-<tag>` (see [`unique_name`]); panics on failure.
    pub fn new(prefix: &str, tag: &str) -> Netns {
        let ns = Netns {
            name: unique_name(prefix, tag),
        };
        run("ip", &["netns", "add", &ns.name]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, as a runtime passes it (`CNI_NETNS`).
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    pub fn path_str(&self) -> String {
        self.path().to_string_lossy().into_owned()
    }

    /// `ip -n <name> ARGS`; panics with stderr on failure, returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        String::from_utf8_lossy(&run("ip", &full).stdout).into_owned()
    }

    /// Runs `program ARGS` inside the namespace (`ip netns exec`) and returns its output,
    /// whatever its exit status.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {} {program}: {e}", self.name))
    }

    /// A command that runs `program` inside the namespace: `nsenter --net=<path> -- program`,
    /// which joins only the network namespace and then execs `program` (same PID, same exit
    /// status, stdio passed through). Add arguments, environment and stdio as to any `Command`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(find_tool("nsenter"));
        cmd.arg(format!("--net={}", self.path_str()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// PIDs of the processes inside the namespace.
    pub fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Kills every process inside and deletes the namespace. Idempotent; also done on drop.
    pub fn delete(&self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if !self.path().exists() {
            return;
        }
        match Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "deleting netns {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("deleting netns {}: {e}", self.name),
        }
    }
}

impl Deref for Netns {
    type Target = str;

    fn deref(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.delete();
    }
}

/// The absolute path of `tool` on `PATH` (so that a command with a cleared environment still
/// finds it), or the bare name when it is not there.
fn find_tool(tool: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(tool))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from(tool))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_tagged() {
        let a = unique_name("veilx", "node");
        let b = unique_name("veilx", "node");
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("veilx-{}-", std::process::id())));
        assert!(a.ends_with("-node"));
        assert!(!unique_name("veilx", "").ends_with('-'));
    }

    #[test]
    fn the_test_name_comes_from_the_thread() {
        assert!(current_test().ends_with("the_test_name_comes_from_the_thread"));
    }

    #[test]
    fn a_namespace_exists_until_dropped_even_on_panic() {
        require_root!();
        let path = std::thread::spawn(|| {
            let ns = Netns::new("veilsup", "t");
            let path = ns.path();
            assert!(path.exists());
            assert!(ns.ip(&["link", "show", "lo"]).contains("UP"));
            let out = ns.command("ip").args(["-o", "link"]).output().unwrap();
            assert!(out.status.success());
            // Only the namespace's own loopback is visible inside it.
            assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
            panic!("{}", path.display());
        })
        .join()
        .expect_err("the thread panicked");
        let path = path.downcast_ref::<String>().unwrap();
        assert!(!Path::new(path).exists(), "{path} survived the panic");
    }
}
