//! The lab's long-running processes (API stand-in, kubelets, agents): started detached inside a
//! namespace, with a pid file and a log file, and found again by later `veilnet lab` commands.
//!
//! The API stand-in and the kubelets run this lab binary (`veilnet-lab`); a node's agent and
//! datapath run the product's `veilnet` binary ([`veilnet_binary`]), as they would on a real node.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use veilnet::netns::{self, NetnsError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("failed to prepare {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to start {role}: {source}")]
    Spawn {
        role: String,
        source: std::io::Error,
    },
    #[error("cannot find the veilnet-lab binary: {0}")]
    CurrentExe(std::io::Error),
    #[error("no veilnet binary at {0} (${VEILNET_ENV}, else beside veilnet-lab): build the workspace (cargo build --workspace)")]
    NoVeilnet(PathBuf),
}

/// Names the `veilnet` binary the lab runs on its nodes (default: the one beside `veilnet-lab`).
pub const VEILNET_ENV: &str = "VEILNET";

pub type Result<T> = std::result::Result<T, DaemonError>;

/// This binary (`veilnet-lab`): the API stand-in and the kubelets run it.
pub fn lab_binary() -> Result<PathBuf> {
    std::env::current_exe().map_err(DaemonError::CurrentExe)
}

/// The product's `veilnet` binary that lab nodes run as agent and datapath: `$VEILNET` if set
/// (made absolute: daemons start from other directories' point of view), else the `veilnet`
/// beside this binary (the same `cargo build`).
pub fn veilnet_binary() -> Result<PathBuf> {
    let path = match std::env::var_os(VEILNET_ENV).filter(|v| !v.is_empty()) {
        Some(v) => std::path::absolute(PathBuf::from(v)).map_err(DaemonError::CurrentExe)?,
        None => lab_binary()?.with_file_name("veilnet"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(DaemonError::NoVeilnet(path))
    }
}

/// One daemon of a lab, e.g. `apiserver` or `kubelet-node-1`.
pub struct Daemon<'a> {
    pub role: String,
    /// The binary it runs ([`lab_binary`] or [`veilnet_binary`]).
    pub program: PathBuf,
    pub netns: String,
    pub args: Vec<String>,
    pub pid_dir: &'a Path,
    pub log_dir: &'a Path,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The pid a daemon's pid file names, if that process is still alive and is still the daemon (a
/// recycled pid running something else does not count). Our own daemons carry a `--lab-role`
/// marker on their command line; a foreign program (etcd, kube-apiserver, …, which refuse unknown
/// flags) is recognised by the program path its pid file records.
pub fn running_pid(pid_dir: &Path, role: &str) -> Option<i32> {
    let text = std::fs::read_to_string(pid_dir.join(format!("{role}.pid"))).ok()?;
    let mut lines = text.lines();
    let pid: i32 = lines.next()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if let Some(program) = lines.next().filter(|l| !l.is_empty()) {
        let argv0 = cmdline.split(|b| *b == 0).next()?;
        return (argv0 == program.as_bytes()).then_some(pid);
    }
    let marker = format!("--lab-role\0{role}\0");
    let haystack = [cmdline.as_slice(), b"\0"].concat();
    haystack
        .windows(marker.len())
        .any(|w| w == marker.as_bytes())
        .then_some(pid)
}

impl Daemon<'_> {
    /// Starts the daemon unless it already runs. Returns its pid and whether it was started now.
    pub fn ensure_started(&self) -> Result<(i32, bool)> {
        self.start(true)
    }

    /// [`Self::ensure_started`] for a program that is not ours and takes no `--lab-role` flag.
    pub fn ensure_started_foreign(&self) -> Result<(i32, bool)> {
        self.start(false)
    }

    fn start(&self, marked: bool) -> Result<(i32, bool)> {
        if let Some(pid) = running_pid(self.pid_dir, &self.role) {
            return Ok((pid, false));
        }
        std::fs::create_dir_all(self.pid_dir).map_err(io_err(self.pid_dir))?;
        std::fs::create_dir_all(self.log_dir).map_err(io_err(self.log_dir))?;
        let log_path = self.log_dir.join(format!("{}.log", self.role));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        let log2 = log.try_clone().map_err(io_err(&log_path))?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        // Lets `running_pid` recognise the process (a hidden global flag of both binaries,
        // otherwise ignored).
        if marked {
            cmd.arg("--lab-role").arg(&self.role);
        }
        netns::command_in(&self.netns, &mut cmd)?;
        // Own session: the daemon outlives `lab up` and ignores the terminal's signals. std's
        // `process_group` would only give a new process group, still on the terminal, and no
        // crate wraps setsid for a child, so this stays a `pre_exec` hook.
        // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe
        // calls are allowed: setsid(2) is one, and the closure captures and allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| DaemonError::Spawn {
            role: self.role.clone(),
            source,
        })?;
        let pid = child.id() as i32;
        let pid_path = self.pid_dir.join(format!("{}.pid", self.role));
        let record = if marked {
            format!("{pid}\n")
        } else {
            format!("{pid}\n{}\n", self.program.display())
        };
        write_file(&pid_path, &record)?;
        Ok((pid, true))
    }
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    veilnet::fsutil::write_atomic(path, text.as_bytes()).map_err(io_err(path))
}
