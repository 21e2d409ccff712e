//! Containers as plain processes: the lab has no images, so a container is its `command` + `args`
//! run inside the pod's network namespace, in its own process group, with its `env`, logging to
//! `<pod dir>/<container>.log`.
//!
//! Each container has a record file (`<container>.state`: pid with the process start time, so a
//! recycled pid is not mistaken for it, restart count, last exit), so that a restarted kubelet
//! adopts the processes of the previous one instead of starting them twice.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::status::Termination;
use veilnet::netns::{self, NetnsError};

/// Restart backoff bounds (the lab's: a real kubelet uses 10 s .. 5 min).
pub const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A container that ran this long without exiting has its backoff forgotten.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("container {container:?} has no command: the lab runs no images, set `command`")]
    NoCommand { container: String },
    /// The lab has no mount namespace: a hostPath mount such as the install manifest's
    /// `/host/opt/cni/bin` would be a path of this machine's own, so such a container is refused
    /// rather than run against the host's filesystem.
    #[error(
        "container {container:?} mounts hostPath volumes ({mounts}): the lab runs containers as \
         host processes without a mount namespace, so it refuses them instead of letting them \
         write to this machine's files"
    )]
    HostPathMounts { container: String, mounts: String },
    #[error("container {container:?}: executable {program:?} not found in $PATH ({path})")]
    NotFound {
        container: String,
        program: String,
        path: String,
    },
    #[error("container {container:?}: {source}")]
    Netns {
        container: String,
        source: NetnsError,
    },
    #[error("container {container:?}: failed to open log {path}: {source}")]
    Log {
        container: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("container {container:?}: failed to start {program}: {source}")]
    Spawn {
        container: String,
        program: String,
        source: std::io::Error,
    },
}

/// What to execute for one container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub container: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
}

/// Values the downward API may refer to.
#[derive(Clone, Debug, Default)]
pub struct EnvContext {
    pub pod_ip: Option<String>,
    pub host_ip: String,
    pub node_name: String,
    /// `PATH` for resolving programs and for the process.
    pub path: String,
}

/// `PATH` with the directory of the running veilnet binary first, so that pods can run
/// `veilnet lab agnhost …`.
pub fn lab_path() -> String {
    let system = std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    match std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        Some(dir) => format!("{}:{system}", dir.display()),
        None => system,
    }
}

/// `which`: a name with a slash is taken as is, else the first executable file in `path`.
pub fn resolve_program(program: &str, path: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| executable(p))
}

/// A downward-API `fieldRef`, for the paths pods commonly use.
fn field_ref(pod: &Pod, path: &str, ctx: &EnvContext) -> Option<String> {
    match path {
        "metadata.name" => pod.metadata.name.clone(),
        "metadata.namespace" => pod.metadata.namespace.clone(),
        "metadata.uid" => pod.metadata.uid.clone(),
        "spec.nodeName" => Some(ctx.node_name.clone()),
        "spec.serviceAccountName" => pod.spec.as_ref()?.service_account_name.clone(),
        "status.podIP" | "status.podIPs" => ctx.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => Some(ctx.host_ip.clone()),
        _ => {
            let key = path
                .strip_prefix("metadata.labels['")
                .map(|r| (r, true))
                .or_else(|| {
                    path.strip_prefix("metadata.annotations['")
                        .map(|r| (r, false))
                })?;
            let name = key.0.strip_suffix("']")?;
            let map = if key.1 {
                pod.metadata.labels.as_ref()
            } else {
                pod.metadata.annotations.as_ref()
            };
            map?.get(name).cloned()
        }
    }
}

/// Plans the process of `container`. Returns warnings for what the lab ignores.
pub fn plan_launch(
    pod: &Pod,
    container: &Container,
    ctx: &EnvContext,
) -> Result<(Launch, Vec<String>), ContainerError> {
    // Other volumes (the ServiceAccount token the real API server injects, emptyDir,
    // configMap) are simply absent: the process finds nothing at their paths.
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    let host_paths: Vec<String> = container
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| {
            let volume = volumes?.iter().find(|v| v.name == m.name)?;
            let host = volume.host_path.as_ref()?;
            Some(format!("{} ({}) at {}", m.name, host.path, m.mount_path))
        })
        .collect();
    if !host_paths.is_empty() {
        return Err(ContainerError::HostPathMounts {
            container: container.name.clone(),
            mounts: host_paths.join(", "),
        });
    }
    let mut words: Vec<String> = container.command.clone().unwrap_or_default();
    if words.is_empty() {
        return Err(ContainerError::NoCommand {
            container: container.name.clone(),
        });
    }
    words.extend(container.args.clone().unwrap_or_default());
    let program_name = words.remove(0);
    let mut warnings = Vec::new();
    // Later entries win, as in Kubernetes; the pod name is the hostname a container would see.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), ctx.path.clone());
    if let Some(name) = &pod.metadata.name {
        env.insert("HOSTNAME".into(), name.clone());
    }
    for var in container.env.iter().flatten() {
        if let Some(value) = &var.value {
            env.insert(var.name.clone(), value.clone());
        } else if let Some(from) = &var.value_from {
            match from
                .field_ref
                .as_ref()
                .and_then(|f| field_ref(pod, &f.field_path, ctx))
            {
                Some(v) => {
                    env.insert(var.name.clone(), v);
                }
                None => warnings.push(format!(
                    "env {:?} of container {:?}: valueFrom is not supported in the lab, skipped",
                    var.name, container.name
                )),
            }
        } else {
            env.insert(var.name.clone(), String::new());
        }
    }
    if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        warnings.push(format!(
            "envFrom of container {:?} is not supported in the lab, skipped",
            container.name
        ));
    }
    let path = env.get("PATH").cloned().unwrap_or_default();
    let program =
        resolve_program(&program_name, &path).ok_or_else(|| ContainerError::NotFound {
            container: container.name.clone(),
            program: program_name.clone(),
            path,
        })?;
    Ok((
        Launch {
            container: container.name.clone(),
            program,
            args: words,
            env: env.into_iter().collect(),
            working_dir: container.working_dir.clone().filter(|d| !d.is_empty()),
        },
        warnings,
    ))
}

/// What the node remembers about one container (`<container>.state`): its process while it
/// runs, its last exit, and the restart count, so that a restarted kubelet neither starts a
/// container twice nor forgets that it completed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// 0 when not running.
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`: tells a recycled pid apart.
    pub start_ticks: u64,
    pub started_at: Option<jiff::Timestamp>,
    pub restart_count: u32,
    pub last_exit: Option<Termination>,
}

pub fn log_path(pod_dir: &Path, container: &str) -> PathBuf {
    pod_dir.join(format!("{container}.log"))
}

fn record_path(pod_dir: &Path, container: &str) -> PathBuf {
    pod_dir.join(format!("{container}.state"))
}

pub fn write_record(pod_dir: &Path, container: &str, record: &ContainerRecord) {
    let path = record_path(pod_dir, container);
    let result = serde_json::to_vec(record)
        .map_err(std::io::Error::other)
        .and_then(|bytes| veilnet::fsutil::write_atomic(&path, &bytes));
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "failed to write container record");
    }
}

/// Every container record in a pod dir, by container name.
pub fn read_records(pod_dir: &Path) -> BTreeMap<String, ContainerRecord> {
    let Ok(entries) = std::fs::read_dir(pod_dir) else {
        return BTreeMap::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let container = name.strip_suffix(".state")?.to_string();
            let record = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            Some((container, record))
        })
        .collect()
}

/// Start time of a live (non-zombie) process.
pub fn process_start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parens: fields are counted after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); starttime is field 22.
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// True if the process of the record is still the one we started.
pub fn record_alive(record: &ContainerRecord) -> bool {
    record.pid > 0 && process_start_ticks(record.pid) == Some(record.start_ticks)
}

/// A started process.
pub struct Spawned {
    pub child: tokio::process::Child,
    pub pid: i32,
    pub start_ticks: u64,
}

/// Starts the container's process inside `netns` (None: the kubelet's own, for host-network
/// pods), in its own process group.
pub fn spawn(
    launch: &Launch,
    netns_name: Option<&str>,
    log: &Path,
) -> Result<Spawned, ContainerError> {
    let container = launch.container.clone();
    let open_log = || {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| ContainerError::Log {
                container: container.clone(),
                path: log.to_path_buf(),
                source,
            })
    };
    let stdout = open_log()?;
    let stderr = open_log()?;
    let mut cmd = std::process::Command::new(&launch.program);
    cmd.args(&launch.args)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    if let Some(dir) = &launch.working_dir {
        cmd.current_dir(dir);
    }
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    if let Some(name) = netns_name {
        netns::command_in(name, &mut cmd).map_err(|source| ContainerError::Netns {
            container: container.clone(),
            source,
        })?;
    }
    let mut cmd = tokio::process::Command::from(cmd);
    // The process must outlive a kubelet restart.
    cmd.kill_on_drop(false);
    let child = cmd.spawn().map_err(|source| ContainerError::Spawn {
        container: container.clone(),
        program: launch.program.display().to_string(),
        source,
    })?;
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    let start_ticks = process_start_ticks(pid).unwrap_or(0);
    Ok(Spawned {
        child,
        pid,
        start_ticks,
    })
}

/// Signals the container's process group, but only while its leader is still the process we
/// started (same start time): once the leader is gone its PID, and so the group ID, can be reused
/// by an unrelated process (another lab's daemons are session leaders too). Leftover children are
/// killed with the pod's namespace (`netns::signal_members`).
pub fn signal_group(pid: i32, start_ticks: u64, signal: Signal) {
    if pid <= 0 || process_start_ticks(pid) != Some(start_ticks) {
        return;
    }
    if killpg(Pid::from_raw(pid), signal).is_err() {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// True while the group's leader, the process we started, is alive.
pub fn group_alive(pid: i32, start_ticks: u64) -> bool {
    pid > 0 && process_start_ticks(pid) == Some(start_ticks)
}

/// Wait before the restart after `restarts` earlier restarts: 1 s, 2 s, 4 s … capped at 30 s.
pub fn restart_backoff(restarts: u32) -> Duration {
    let factor = 1u64.checked_shl(restarts.min(16)).unwrap_or(u64::MAX);
    BACKOFF_INITIAL
        .checked_mul(u32::try_from(factor).unwrap_or(u32::MAX))
        .unwrap_or(BACKOFF_MAX)
        .min(BACKOFF_MAX)
}

/// How an exit is reported: `(exitCode, signal, reason)`.
pub fn describe_exit(status: std::process::ExitStatus) -> (i32, Option<i32>, &'static str) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => (0, None, "Completed"),
        (Some(code), _) => (code, None, "Error"),
        (None, Some(sig)) => (128 + sig, Some(sig), "Error"),
        (None, None) => (255, None, "Unknown"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector};

    fn pod_with(container: Container) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.name = Some("web".into());
        pod.metadata.namespace = Some("default".into());
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            containers: vec![container],
            ..Default::default()
        });
        pod
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(restart_backoff(0), Duration::from_secs(1));
        assert_eq!(restart_backoff(1), Duration::from_secs(2));
        assert_eq!(restart_backoff(4), Duration::from_secs(16));
        assert_eq!(restart_backoff(5), Duration::from_secs(30));
        assert_eq!(restart_backoff(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn launch_uses_command_args_env_and_downward_api() {
        let c = Container {
            name: "app".into(),
            command: Some(vec!["sh".into(), "-c".into()]),
            args: Some(vec!["echo $A".into()]),
            env: Some(vec![
                EnvVar {
                    name: "A".into(),
                    value: Some("1".into()),
                    ..Default::default()
                },
                EnvVar {
                    name: "IP".into(),
                    value_from: Some(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "status.podIP".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                EnvVar {
                    name: "SECRET".into(),
                    value_from: Some(EnvVarSource::default()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let ctx = EnvContext {
            pod_ip: Some("10.1.0.5".into()),
            host_ip: "172.30.0.11".into(),
            node_name: "node-1".into(),
            path: "/usr/bin:/bin".into(),
        };
        let (launch, warnings) = plan_launch(&pod_with(c.clone()), &c, &ctx).unwrap();
        assert!(launch.program.ends_with("sh"));
        assert_eq!(launch.args, vec!["-c", "echo $A"]);
        let env: BTreeMap<_, _> = launch.env.into_iter().collect();
        assert_eq!(env["A"], "1");
        assert_eq!(env["IP"], "10.1.0.5");
        assert_eq!(env["HOSTNAME"], "web");
        assert!(!env.contains_key("SECRET"));
        assert_eq!(warnings.len(), 1);
    }

    #[test]
    fn missing_command_or_program_is_an_error() {
        let c = Container {
            name: "app".into(),
            ..Default::default()
        };
        let ctx = EnvContext {
            path: "/usr/bin:/bin".into(),
            ..Default::default()
        };
        assert!(matches!(
            plan_launch(&pod_with(c.clone()), &c, &ctx),
            Err(ContainerError::NoCommand { .. })
        ));
        let c = Container {
            name: "app".into(),
            command: Some(vec!["no-such-program-veil".into()]),
            ..Default::default()
        };
        assert!(matches!(
            plan_launch(&pod_with(c.clone()), &c, &ctx),
            Err(ContainerError::NotFound { .. })
        ));
    }

    #[test]
    fn a_container_that_mounts_a_host_path_is_refused_before_it_can_touch_the_host() {
        use k8s_openapi::api::core::v1::{HostPathVolumeSource, Volume, VolumeMount};
        // The install manifest's install-cni: `cp ... /host/opt/cni/bin/` would write to this
        // machine's /host if it ran as a plain host process.
        let mount = |name: &str, path: &str| VolumeMount {
            name: name.into(),
            mount_path: path.into(),
            ..Default::default()
        };
        let c = Container {
            name: "install-cni".into(),
            command: Some(vec!["/bin/sh".into(), "-c".into(), "true".into()]),
            volume_mounts: Some(vec![
                mount(
                    "kube-api-access-x",
                    "/var/run/secrets/kubernetes.io/serviceaccount",
                ),
                mount("cni-bin", "/host/opt/cni/bin"),
            ]),
            ..Default::default()
        };
        let mut pod = pod_with(c.clone());
        pod.spec.as_mut().unwrap().volumes = Some(vec![
            Volume {
                name: "kube-api-access-x".into(),
                projected: Some(Default::default()),
                ..Default::default()
            },
            Volume {
                name: "cni-bin".into(),
                host_path: Some(HostPathVolumeSource {
                    path: "/opt/cni/bin".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ]);
        let ctx = EnvContext {
            path: "/usr/bin:/bin".into(),
            ..Default::default()
        };
        let err = plan_launch(&pod, &c, &ctx).unwrap_err();
        assert!(
            matches!(err, ContainerError::HostPathMounts { .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("cni-bin (/opt/cni/bin) at /host/opt/cni/bin"),
            "{msg}"
        );
        assert!(!msg.contains("kube-api-access"), "{msg}");
        // The ServiceAccount token volume the real API server adds to every pod is no reason to
        // refuse one.
        let c = Container {
            volume_mounts: Some(vec![mount(
                "kube-api-access-x",
                "/var/run/secrets/kubernetes.io/serviceaccount",
            )]),
            ..c
        };
        assert!(plan_launch(&pod, &c, &ctx).is_ok());
    }

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let pid = std::process::id() as i32;
        let ticks = process_start_ticks(pid).unwrap();
        let rec = ContainerRecord {
            pid,
            start_ticks: ticks,
            ..Default::default()
        };
        assert!(record_alive(&rec));
        assert!(!record_alive(&ContainerRecord {
            start_ticks: ticks + 1,
            ..rec
        }));
    }
}
