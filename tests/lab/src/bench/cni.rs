//! CNI ADD latency: veilnet-cni against Debian's reference bridge + host-local plugins, in the same
//! run, on the same machine, 50 sequential and 50 parallel ADDs each (then the DELs).
//!
//! Each plugin is spawned directly from a thread that entered a throwaway "node" namespace, so the
//! numbers are the plugin's own cost (fork+exec included, as a runtime pays it), with no `ip netns
//! exec` in between.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use veilnet::netns;

use super::{ms, percentile};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error("{0} not found")]
    Missing(PathBuf),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("{plugin} {command} for {container} failed: {output}")]
    Plugin {
        plugin: String,
        command: String,
        container: String,
        output: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct CniBenchArgs {
    /// Directory holding `veilnet-cni` (default: beside this binary).
    #[arg(long)]
    pub veilnet_cni_dir: Option<PathBuf>,
    /// Directory holding the reference plugins.
    #[arg(long, default_value = "/usr/lib/cni")]
    pub reference_dir: PathBuf,
    /// ADDs per series.
    #[arg(long, default_value_t = 50)]
    pub count: usize,
}

/// Removes the bench's namespaces and state, also on panic.
struct Cleanup {
    namespaces: Vec<String>,
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = netns::delete(ns);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Plugin {
    label: &'static str,
    path: PathBuf,
    bin_dir: PathBuf,
    config: serde_json::Value,
}

fn invoke(
    p: &Plugin,
    command: &str,
    container: &str,
    netns_path: &str,
) -> Result<Duration, BenchError> {
    let started = Instant::now();
    let mut child = Command::new(&p.path)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns_path)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &p.bin_dir)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(p.config.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let took = started.elapsed();
    if !out.status.success() {
        return Err(BenchError::Plugin {
            plugin: p.label.into(),
            command: command.into(),
            container: container.into(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(took)
}

#[derive(Debug, Default)]
struct Series {
    adds: Vec<Duration>,
    dels: Vec<Duration>,
}

/// Runs one series (sequential or parallel) of ADDs then DELs for `p`, inside `node_ns`.
fn series(
    p: Arc<Plugin>,
    node_ns: &str,
    pods: &[String],
    parallel: bool,
) -> Result<Series, BenchError> {
    let node = node_ns.to_string();
    let pods = pods.to_vec();
    netns::run_in(&node, move || -> Result<Series, BenchError> {
        let ids: Vec<(String, String)> = pods
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                (
                    format!("bench{:058x}", i),
                    netns::path(ns).display().to_string(),
                )
            })
            .collect();
        let run = |command: &'static str| -> Result<Vec<Duration>, BenchError> {
            if !parallel {
                return ids
                    .iter()
                    .map(|(id, path)| invoke(&p, command, id, path))
                    .collect();
            }
            // Threads spawned here inherit this thread's namespace; start them all at once.
            let barrier = Arc::new(Barrier::new(ids.len()));
            let handles: Vec<_> = ids
                .iter()
                .cloned()
                .map(|(id, path)| {
                    let (p, barrier) = (p.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        invoke(&p, command, &id, &path)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("bench thread"))
                .collect()
        };
        Ok(Series {
            adds: run("ADD")?,
            dels: run("DEL")?,
        })
    })?
}

pub fn run(args: CniBenchArgs) -> Result<(), BenchError> {
    let veilnet_dir = match args.veilnet_cni_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    let veilnet_cni = veilnet_dir.join("veilnet-cni");
    for p in [
        &veilnet_cni,
        &args.reference_dir.join("bridge"),
        &args.reference_dir.join("host-local"),
    ] {
        if !p.exists() {
            return Err(BenchError::Missing(p.clone()));
        }
    }
    let tag = format!("veilbench-{}", std::process::id());
    let dir = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&dir)?;
    let node_ns = format!("{tag}-node");
    let pods: Vec<String> = (0..args.count).map(|i| format!("{tag}-p{i}")).collect();
    let mut guard = Cleanup {
        namespaces: vec![node_ns.clone()],
        dir: dir.clone(),
    };
    netns::add(&node_ns)?;
    for p in &pods {
        netns::add(p)?;
        guard.namespaces.push(p.clone());
    }

    let veilnet = Arc::new(Plugin {
        label: "veilnet-cni",
        path: veilnet_cni,
        bin_dir: veilnet_dir,
        config: serde_json::json!({
            "cniVersion": "1.1.0", "name": "bench-veilnet", "type": "veilnet-cni",
            "subnet": "10.250.0.0/24", "bridge": "veilbr-bench", "mtu": 1450,
            "stateDir": dir.join("veilnet"),
        }),
    });
    let reference = Arc::new(Plugin {
        label: "bridge+host-local",
        path: args.reference_dir.join("bridge"),
        bin_dir: args.reference_dir.clone(),
        config: serde_json::json!({
            "cniVersion": "1.0.0", "name": "bench-reference", "type": "bridge",
            "bridge": "cnibench0", "isGateway": true, "mtu": 1450,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.251.0.0/24"}]],
                     "dataDir": dir.join("host-local")},
        }),
    });

    println!(
        "CNI ADD/DEL latency, {} pods per series, same machine, same run (ms)",
        args.count
    );
    println!(
        "{:<20} {:<10} {:>9} {:>9} {:>9} {:>9}",
        "plugin", "series", "ADD p50", "ADD p99", "DEL p50", "DEL p99"
    );
    for p in [&veilnet, &reference] {
        for parallel in [false, true] {
            let mut s = series(p.clone(), &node_ns, &pods, parallel)?;
            s.adds.sort();
            s.dels.sort();
            println!(
                "{:<20} {:<10} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                p.label,
                if parallel { "parallel" } else { "sequential" },
                ms(percentile(&s.adds, 50.0)),
                ms(percentile(&s.adds, 99.0)),
                ms(percentile(&s.dels, 50.0)),
                ms(percentile(&s.dels, 99.0)),
            );
        }
    }
    drop(guard);
    Ok(())
}
