//! Named network namespaces (`/run/netns/NAME`, the same ones `ip netns` shows) and running code or
//! processes inside them.
//!
//! Lifecycle goes through iproute2's `ip netns`, so that the namespaces stay interoperable with the
//! tools operators already use (`ip netns exec`, `ip -n`). Entering a namespace is done here with
//! `setns(2)`: on a dedicated thread for in-process work, and between fork and exec for children.
//! Never `setns` a tokio worker thread: the namespace would leak into unrelated tasks.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where iproute2 keeps named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("invalid network namespace name {0:?}")]
    InvalidName(String),
    #[error("network namespace {name} does not exist")]
    NotFound { name: String },
    #[error("failed to open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("setns into {name} failed: {source}")]
    Setns {
        name: String,
        source: std::io::Error,
    },
    #[error("failed to run `{cmd}`: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("thread running inside {name} panicked")]
    ThreadPanicked { name: String },
    #[error("{0} is not a signal that can be sent")]
    InvalidSignal(i32),
}

pub type Result<T> = std::result::Result<T, NetnsError>;

/// The bind-mounted namespace file of `name`.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// True if the named namespace exists.
pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Names of every named namespace, sorted.
pub fn list() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(NETNS_RUN_DIR)
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn validate(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(NetnsError::InvalidName(name.to_string()))
    }
}

/// Creates the namespace and brings its loopback up. Idempotent.
pub fn add(name: &str) -> Result<()> {
    validate(name)?;
    if !exists(name) {
        run("ip", &["netns", "add", name])?;
    }
    run("ip", &["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes the namespace. Absent is fine. Processes still inside keep it alive in the kernel, so
/// callers kill them first (see [`pids`]).
pub fn delete(name: &str) -> Result<()> {
    validate(name)?;
    if exists(name) {
        run("ip", &["netns", "delete", name])?;
    }
    Ok(())
}

/// PIDs of every process whose network namespace is `name`.
pub fn pids(name: &str) -> Result<Vec<i32>> {
    validate(name)?;
    if !exists(name) {
        return Ok(Vec::new());
    }
    let out = run("ip", &["netns", "pids", name])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

fn open(name: &str) -> Result<File> {
    validate(name)?;
    let p = path(name);
    File::open(&p).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            NetnsError::NotFound {
                name: name.to_string(),
            }
        } else {
            NetnsError::Open { path: p, source }
        }
    })
}

/// Moves the *calling thread* into the namespace. Only for threads that are dedicated to it.
pub fn enter_current_thread(name: &str) -> Result<()> {
    let file = open(name)?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Setns {
        name: name.to_string(),
        source: std::io::Error::from(e),
    })
}

/// Runs `f` on a fresh thread inside the namespace and returns its result. Sockets opened by `f`
/// belong to that namespace for their whole life, even when used from other threads later.
pub fn run_in<T, F>(name: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let file = open(name)?;
    let owned = name.to_string();
    let handle = std::thread::Builder::new()
        .name(format!("netns-{name}"))
        .spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                NetnsError::Setns {
                    name: owned,
                    source: e.into(),
                }
            })?;
            Ok(f())
        })
        .map_err(|source| NetnsError::Spawn {
            cmd: "thread".into(),
            source,
        })?;
    handle.join().map_err(|_| NetnsError::ThreadPanicked {
        name: name.to_string(),
    })?
}

/// Makes `cmd` start inside the namespace (setns between fork and exec).
pub fn command_in(name: &str, cmd: &mut Command) -> Result<()> {
    let file = open(name)?;
    // `pre_exec` is `unsafe` in std and has no safe counterpart in a well-kept crate (the
    // alternative, `ip netns exec` or `nsenter` in front of the program, changes what runs).
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // work is allowed: it makes one setns(2) call through nix (no allocation, no lock) on the
    // descriptor that `file`, moved into the closure, keeps open; an error becomes an
    // `io::Error` from the raw errno, which allocates nothing either.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    Ok(())
}

/// Sends `signal` to every process inside the namespace and returns how many were signalled.
///
/// Race-free against PID reuse: each candidate is pinned with a pidfd, its namespace is checked
/// again through the pinned process, and the signal goes through the pidfd. A PID that exited and
/// was handed to an unrelated process between the scan and the signal is never hit (with a small
/// `pid_max` and many short-lived processes, that reuse does happen).
pub fn signal_members(name: &str, signal: i32) -> Result<usize> {
    use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};
    use std::os::unix::fs::MetadataExt;
    validate(name)?;
    let signal = Signal::from_named_raw(signal).ok_or(NetnsError::InvalidSignal(signal))?;
    let Ok(target) = std::fs::metadata(path(name)) else {
        return Ok(0);
    };
    let same_ns = |pid: i32| {
        std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .is_ok_and(|m| m.ino() == target.ino() && m.dev() == target.dev())
    };
    let me = std::process::id() as i32;
    let mut signalled = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Ok(0);
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me || !same_ns(pid) {
            continue;
        }
        let Some(target_pid) = Pid::from_raw(pid) else {
            continue;
        };
        let Ok(pidfd) = pidfd_open(target_pid, PidfdFlags::empty()) else {
            continue; // already gone
        };
        // Pinned now: if the PID was reused before pidfd_open, this check fails.
        if same_ns(pid) && pidfd_send_signal(&pidfd, signal).is_ok() {
            signalled += 1;
        }
    }
    Ok(signalled)
}

/// Runs a command to completion and fails with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let display = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| NetnsError::Spawn {
            cmd: display.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            cmd: display,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(validate("veilnet.n1").is_ok());
        assert!(validate("veilnet.pod.default.web-0.1a2b3c4d").is_ok());
        assert!(validate("").is_err());
        assert!(validate("../etc").is_err());
        assert!(validate("a/b").is_err());
        assert!(validate(".hidden").is_err());
    }

    #[test]
    fn path_is_under_run_netns() {
        assert_eq!(path("x"), PathBuf::from("/run/netns/x"));
    }
}
