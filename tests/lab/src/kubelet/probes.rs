//! Readiness and liveness probes. `tcpSocket` and `httpGet` connect from the kubelet (in the node's namespace)
//! to the pod IP, as a real kubelet does, so they also exercise node-to-pod connectivity; `exec`
//! runs the command inside the pod's namespace. Without a readiness probe a running container is
//! ready; a failing liveness probe gets the container killed (and restarted per policy).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::containers;
use veilnet::netns;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeAction {
    Exec(Vec<String>),
    Tcp {
        host: Option<IpAddr>,
        port: u16,
    },
    Http {
        host: Option<IpAddr>,
        port: u16,
        path: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    pub action: ProbeAction,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

fn resolve_port(port: &IntOrString, container: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok().filter(|p| *p > 0),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

fn secs(v: Option<i32>, default: u64) -> Duration {
    Duration::from_secs(
        v.and_then(|v| u64::try_from(v).ok())
            .filter(|v| *v > 0)
            .unwrap_or(default),
    )
}

/// The probe to run, or None (with a reason) when it is absent or unsupported.
pub fn probe_spec(probe: &Probe, container: &Container) -> Result<ProbeSpec, String> {
    let action = if let Some(exec) = &probe.exec {
        let cmd = exec.command.clone().unwrap_or_default();
        if cmd.is_empty() {
            return Err("exec probe without command".into());
        }
        ProbeAction::Exec(cmd)
    } else if let Some(tcp) = &probe.tcp_socket {
        ProbeAction::Tcp {
            host: tcp.host.as_deref().and_then(|h| h.parse().ok()),
            port: resolve_port(&tcp.port, container).ok_or("tcpSocket probe: bad port")?,
        }
    } else if let Some(http) = &probe.http_get {
        if http
            .scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"))
        {
            return Err("HTTPS probes are not supported in the lab".into());
        }
        ProbeAction::Http {
            host: http.host.as_deref().and_then(|h| h.parse().ok()),
            port: resolve_port(&http.port, container).ok_or("httpGet probe: bad port")?,
            path: http
                .path
                .clone()
                .filter(|p| p.starts_with('/'))
                .unwrap_or_else(|| "/".into()),
        }
    } else {
        return Err("probe type not supported in the lab (use exec, tcpSocket or httpGet)".into());
    };
    Ok(ProbeSpec {
        action,
        initial_delay: Duration::from_secs(
            probe
                .initial_delay_seconds
                .and_then(|v| u64::try_from(v).ok())
                .unwrap_or(0),
        ),
        period: secs(probe.period_seconds, 10),
        timeout: secs(probe.timeout_seconds, 1),
        success_threshold: probe
            .success_threshold
            .and_then(|v| u32::try_from(v).ok())
            .filter(|v| *v > 0)
            .unwrap_or(1),
        failure_threshold: probe
            .failure_threshold
            .and_then(|v| u32::try_from(v).ok())
            .filter(|v| *v > 0)
            .unwrap_or(3),
    })
}

/// Result history of one container's probe.
#[derive(Clone, Debug)]
pub struct ProbeState {
    /// Readiness: ready; liveness: alive.
    pub passing: bool,
    successes: u32,
    failures: u32,
    pub next_at: Instant,
}

impl ProbeState {
    /// A fresh container's probe, first run after the delay. A readiness probe starts failing
    /// (not ready until the first success), a liveness probe passing.
    pub fn new(spec: &ProbeSpec, started: Instant, initially_passing: bool) -> Self {
        Self {
            passing: initially_passing,
            successes: 0,
            failures: 0,
            next_at: started + spec.initial_delay,
        }
    }

    /// Applies one result with the thresholds.
    pub fn record(&mut self, ok: bool, spec: &ProbeSpec, now: Instant) {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.successes >= spec.success_threshold {
                self.passing = true;
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.failures >= spec.failure_threshold {
                self.passing = false;
            }
        }
        self.next_at = now + spec.period;
    }
}

/// Runs the probe once; true on success.
pub async fn run_probe(
    spec: &ProbeSpec,
    pod_ip: Option<IpAddr>,
    netns_name: Option<&str>,
    env: &[(String, String)],
) -> bool {
    let attempt = async {
        match &spec.action {
            ProbeAction::Exec(cmd) => exec_probe(cmd, netns_name, env).await,
            ProbeAction::Tcp { host, port } => {
                let Some(ip) = host.or(pod_ip) else {
                    return false;
                };
                tokio::net::TcpStream::connect(SocketAddr::new(ip, *port))
                    .await
                    .is_ok()
            }
            ProbeAction::Http { host, port, path } => {
                let Some(ip) = host.or(pod_ip) else {
                    return false;
                };
                http_probe(SocketAddr::new(ip, *port), path).await
            }
        }
    };
    tokio::time::timeout(spec.timeout, attempt)
        .await
        .unwrap_or(false)
}

async fn exec_probe(cmd: &[String], netns_name: Option<&str>, env: &[(String, String)]) -> bool {
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let Some(program) = containers::resolve_program(&cmd[0], &path) else {
        return false;
    };
    let mut std_cmd = std::process::Command::new(program);
    std_cmd
        .args(&cmd[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if let Some(name) = netns_name {
        if netns::command_in(name, &mut std_cmd).is_err() {
            return false;
        }
    }
    let mut cmd = tokio::process::Command::from(std_cmd);
    cmd.kill_on_drop(true);
    match cmd.status().await {
        Ok(status) => status.success(),
        Err(_) => false,
    }
}

/// Status code of a minimal HTTP/1.1 GET; 200-399 is success, as for the kubelet.
async fn http_probe(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; 256];
    let mut len = 0;
    while len < buf.len() {
        match stream.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
        if buf[..len].contains(&b'\n') {
            break;
        }
    }
    parse_status_code(&buf[..len]).is_some_and(|code| (200..400).contains(&code))
}

/// `HTTP/1.x NNN ...` → NNN.
pub fn parse_status_code(head: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(head).ok()?.lines().next()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, HTTPGetAction, TCPSocketAction};

    #[test]
    fn named_ports_and_defaults() {
        let c = Container {
            name: "app".into(),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..Default::default()
            }]),
            ..Default::default()
        };
        let probe = Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::String("http".into()),
                path: Some("/healthz".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let spec = probe_spec(&probe, &c).unwrap();
        assert_eq!(
            spec.action,
            ProbeAction::Http {
                host: None,
                port: 8080,
                path: "/healthz".into()
            }
        );
        assert_eq!(spec.period, Duration::from_secs(10));
        assert_eq!(spec.failure_threshold, 3);
        let bad = Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::String("nope".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(probe_spec(&bad, &c).is_err());
        assert!(probe_spec(&Probe::default(), &c).is_err());
    }

    #[test]
    fn thresholds() {
        let spec = ProbeSpec {
            action: ProbeAction::Exec(vec!["true".into()]),
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: 2,
            failure_threshold: 2,
        };
        let now = Instant::now();
        let mut st = ProbeState::new(&spec, now, false);
        st.record(true, &spec, now);
        assert!(!st.passing);
        st.record(true, &spec, now);
        assert!(st.passing);
        st.record(false, &spec, now);
        assert!(st.passing);
        st.record(false, &spec, now);
        assert!(!st.passing);
        assert!(ProbeState::new(&spec, now, true).passing);
    }

    #[test]
    fn status_line() {
        assert_eq!(parse_status_code(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(parse_status_code(b"garbage"), None);
    }
}
