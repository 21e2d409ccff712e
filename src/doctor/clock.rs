//! Clock skew between this machine and the API server (its `Date` response header): TLS
//! certificates, service-account tokens and WireGuard's handshake timestamps all assume clocks
//! that agree.

use std::time::Duration;

use super::{Check, Context};

/// Beyond this, something is off (NTP not running) but nothing breaks yet.
pub const WARN_AFTER: Duration = Duration::from_secs(5);
/// Beyond this, tokens and certificates start to look not yet valid or expired.
pub const FAIL_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClockFacts {
    /// No kubeconfig: the check does not run.
    NoApi,
    /// The API server's clock minus ours (milliseconds; the header has a resolution of 1 s).
    Skew {
        server: String,
        skew_ms: i64,
    },
    Unreachable {
        server: String,
        error: String,
    },
}

pub fn gather(ctx: &Context) -> ClockFacts {
    let server = match (&ctx.kubeconfig, ctx.in_cluster_api) {
        (Some(kubeconfig), _) => server_of(kubeconfig),
        (None, true) => "the in-cluster API".to_string(),
        (None, false) => return ClockFacts::NoApi,
    };
    let kubeconfig = ctx.kubeconfig.clone();
    let run = move || measure(kubeconfig.as_deref());
    // The API may be reachable from another namespace only (a lab's control plane).
    let result = match ctx.api_netns.as_deref().or(ctx.netns.as_deref()) {
        None => run(),
        Some(ns) => crate::netns::run_in(ns, run).unwrap_or_else(|e| Err(e.to_string())),
    };
    match result {
        Ok(skew_ms) => ClockFacts::Skew { server, skew_ms },
        Err(error) => ClockFacts::Unreachable { server, error },
    }
}

/// The API server's URL in the kubeconfig's current context (its path when unreadable).
fn server_of(kubeconfig: &std::path::Path) -> String {
    kube::config::Kubeconfig::read_from(kubeconfig)
        .ok()
        .and_then(|kc| {
            let current = kc.current_context.clone()?;
            let cluster = kc
                .contexts
                .iter()
                .find(|c| c.name == current)?
                .context
                .as_ref()?
                .cluster
                .clone();
            kc.clusters
                .iter()
                .find(|c| c.name == cluster)?
                .cluster
                .as_ref()?
                .server
                .clone()
        })
        .unwrap_or_else(|| kubeconfig.display().to_string())
}

/// Milliseconds the API server's clock is ahead of ours; `None`: in-cluster configuration.
fn measure(kubeconfig: Option<&std::path::Path>) -> Result<i64, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let config = match kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| e.to_string())?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| e.to_string())?
            }
            None => kube::Config::incluster().map_err(|e| e.to_string())?,
        };
        let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
        let request = http::Request::get("/version")
            .body(kube::client::Body::empty())
            .map_err(|e| e.to_string())?;
        let before = jiff::Timestamp::now();
        let response = tokio::time::timeout(Duration::from_secs(5), client.send(request))
            .await
            .map_err(|_| "no answer within 5 s".to_string())?
            .map_err(|e| e.to_string())?;
        let after = jiff::Timestamp::now();
        let date = response
            .headers()
            .get(http::header::DATE)
            .and_then(|v| v.to_str().ok())
            .ok_or("the answer has no Date header")?;
        let server = parse_http_date(date)?;
        let midpoint = before + after.duration_since(before) / 2;
        Ok(server.duration_since(midpoint).as_millis() as i64)
    })
}

/// An HTTP `Date` (`Tue, 02 Dec 2026 10:00:30 GMT`).
pub fn parse_http_date(text: &str) -> Result<jiff::Timestamp, String> {
    jiff::fmt::rfc2822::parse(text)
        .map(|z| z.timestamp())
        .map_err(|e| format!("Date {text:?}: {e}"))
}

pub fn check(facts: &ClockFacts) -> Vec<Check> {
    const NAME: &str = "clock.skew";
    match facts {
        ClockFacts::NoApi => Vec::new(),
        ClockFacts::Unreachable { server, error } => vec![Check::warn(
            NAME,
            format!("cannot ask the API server {server} for its time: {error}"),
            "check the kubeconfig (--kubeconfig) and that the API is reachable; the other checks do not need it",
        )],
        ClockFacts::Skew { server, skew_ms } => {
            let abs = Duration::from_millis(skew_ms.unsigned_abs());
            let side = if *skew_ms >= 0 { "ahead of" } else { "behind" };
            let evidence = format!(
                "the API server {server} is {:.1} s {side} this machine",
                abs.as_secs_f64()
            );
            let fix = "run time synchronisation on every node and the control plane (timedatectl status; chronyc tracking)";
            vec![if abs > FAIL_AFTER {
                Check::fail(
                    NAME,
                    format!("{evidence}: tokens, certificates and handshakes break"),
                    fix,
                )
            } else if abs > WARN_AFTER {
                Check::warn(NAME, evidence, fix)
            } else {
                Check::ok(NAME, evidence)
            }]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Verdict;

    fn skew(ms: i64) -> Vec<Check> {
        check(&ClockFacts::Skew {
            server: "https://10.0.0.1:6443".into(),
            skew_ms: ms,
        })
    }

    #[test]
    fn skew_thresholds() {
        assert_eq!(skew(800)[0].verdict, Verdict::Ok);
        assert_eq!(skew(-4_000)[0].verdict, Verdict::Ok);
        let c = &skew(-7_000)[0];
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(c.evidence.contains("7.0 s behind"), "{}", c.evidence);
        let c = &skew(90_000)[0];
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.evidence.contains("90.0 s ahead of"), "{}", c.evidence);
    }

    #[test]
    fn no_api_is_silent_and_unreachable_warns() {
        assert!(check(&ClockFacts::NoApi).is_empty());
        let c = check(&ClockFacts::Unreachable {
            server: "https://x".into(),
            error: "connection refused".into(),
        });
        assert_eq!(c[0].verdict, Verdict::Warn);
    }

    #[test]
    fn http_dates_parse() {
        let t = parse_http_date("Wed, 02 Dec 2026 10:00:30 GMT").unwrap();
        assert_eq!(t.to_string(), "2026-12-02T10:00:30Z");
        assert!(parse_http_date("yesterday").is_err());
    }
}
