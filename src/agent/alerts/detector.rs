//! The anomaly detector: what the node already sees (its flow log's verdicts and its DNS counters)
//! in, alerts out. Pure and bounded: time is passed in, per-pod state is capped, and each pod
//! raises each kind of alert at most once per [`AlertConfig::repeat_after`].
//!
//! What raises an alert:
//! - `scan`: one source pod hit at least [`AlertConfig::scan_destinations`] distinct denied
//!   destinations (address, port, protocol) within a window: a port scan, or lateral movement;
//! - `spoofing`: a local pod sent a frame with an address that is not its own;
//! - `dns-untrusted`: a local pod queried a DNS server outside `trustedDns`;
//! - `dns-tunnel`: at least [`AlertConfig::dns_random_queries`] sampled queries of a pod within a
//!   window had a long random-looking label (tunnelling, generated domains);
//! - `dns-nxdomain`: at least half of a pod's queries in a window (and at least
//!   [`AlertConfig::dns_min_queries`]) were answered NXDOMAIN;
//! - `dns-rate`: a pod's queries in a window exceeded [`AlertConfig::dns_rate_factor`] times its
//!   own baseline (the mean of its earlier windows) and [`AlertConfig::dns_min_queries`];
//! - `new-destination`: a pod of a namespace that opted in (label
//!   `veilnet.io/alert-new-destinations=true`) connected to an address outside the cluster (with
//!   port and protocol) that it did not use during its learning window
//!   ([`AlertConfig::new_destination_learning_seconds`], from its first such connection).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::policy::ObjectRef;

/// Thresholds (the agent's `alerts` config key; README: "Network security").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AlertConfig {
    /// Off: no alert at all.
    pub enabled: bool,
    /// The window every threshold is counted over, in seconds.
    pub window_seconds: u64,
    /// The same pod and kind alert again only after this many seconds.
    pub repeat_after_seconds: u64,
    /// Distinct denied destinations in a window that make a scan.
    pub scan_destinations: usize,
    /// Random-looking sampled queries in a window that make tunnelling.
    pub dns_random_queries: usize,
    /// Queries in a window below which the NXDOMAIN share and the rate are not judged.
    pub dns_min_queries: u64,
    /// A window's queries above this many times the pod's baseline is abnormal.
    pub dns_rate_factor: f64,
    /// Warning Events posted per minute by this node at most (the rest are counted and logged).
    pub max_events_per_minute: u32,
    /// How long a watched pod's destinations outside the cluster are learned, from its first
    /// one, before a new one raises `new-destination`.
    pub new_destination_learning_seconds: u64,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            enabled: true,
            window_seconds: 60,
            repeat_after_seconds: 600,
            scan_destinations: 20,
            dns_random_queries: 5,
            dns_min_queries: 50,
            dns_rate_factor: 10.0,
            max_events_per_minute: 30,
            new_destination_learning_seconds: 3600,
        }
    }
}

impl AlertConfig {
    fn window(&self) -> Duration {
        Duration::from_secs(self.window_seconds.max(1))
    }
    fn repeat_after(&self) -> Duration {
        Duration::from_secs(self.repeat_after_seconds)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlertKind {
    Scan,
    Spoofing,
    DnsUntrusted,
    DnsTunnel,
    DnsNxdomain,
    DnsRate,
    NewDestination,
}

impl AlertKind {
    pub const ALL: [AlertKind; 7] = [
        AlertKind::Scan,
        AlertKind::Spoofing,
        AlertKind::DnsUntrusted,
        AlertKind::DnsTunnel,
        AlertKind::DnsNxdomain,
        AlertKind::DnsRate,
        AlertKind::NewDestination,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Scan => "scan",
            AlertKind::Spoofing => "spoofing",
            AlertKind::DnsUntrusted => "dns-untrusted",
            AlertKind::DnsTunnel => "dns-tunnel",
            AlertKind::DnsNxdomain => "dns-nxdomain",
            AlertKind::DnsRate => "dns-rate",
            AlertKind::NewDestination => "new-destination",
        }
    }
}

/// One alert: the pod it is about, what happened, and the evidence (for the Event's message).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Alert {
    pub kind: AlertKind,
    pub pod: String,
    pub message: String,
}

/// What the detector is told.
#[derive(Clone, Debug, PartialEq)]
pub enum Observation<'a> {
    /// A denied packet from `src` (a pod, local or not) to this destination.
    Denied {
        src: &'a ObjectRef,
        dst: IpAddr,
        port: Option<u16>,
        protocol: &'a str,
    },
    Spoofed {
        pod: &'a ObjectRef,
        detail: String,
    },
    UntrustedDns {
        pod: &'a ObjectRef,
        server: IpAddr,
        qname: Option<&'a str>,
        dropped: bool,
    },
    /// A sampled query of a local pod (to any server).
    DnsQuery {
        pod: &'a ObjectRef,
        qname: &'a str,
    },
    /// A watched local pod's new connection to an address outside the cluster.
    NewEgress {
        pod: &'a ObjectRef,
        dst: IpAddr,
        port: Option<u16>,
        protocol: &'a str,
    },
    /// A local pod's DNS counters: queries so far (trusted + untrusted) and NXDOMAIN answers.
    DnsCounters {
        pod: &'a ObjectRef,
        queries: u64,
        nxdomain: u64,
    },
}

/// What one pod has done lately.
#[derive(Debug, Default)]
struct PodState {
    /// Denied destinations and when each was last hit.
    denied: HashMap<(IpAddr, Option<u16>, String), Instant>,
    /// When each random-looking query was sampled, and an example.
    random: VecDeque<Instant>,
    random_example: String,
    /// DNS counters at the start of the current window, and the window's start.
    window_start: Option<(Instant, u64, u64)>,
    /// Queries in each finished window (at most [`BASELINE_WINDOWS`]).
    history: VecDeque<u64>,
    last_seen: Option<Instant>,
    /// Destinations outside the cluster it used, and when it first used one (its learning
    /// window's start).
    egress: std::collections::HashSet<(IpAddr, Option<u16>, String)>,
    egress_since: Option<Instant>,
}

/// Windows a pod's rate baseline is the mean of (and the least it needs).
const BASELINE_WINDOWS: usize = 10;
const MIN_BASELINE_WINDOWS: usize = 3;
/// Pods tracked at most; the least recently seen go first.
const MAX_PODS: usize = 4096;
/// Denied destinations remembered per pod at most.
const MAX_DENIED: usize = 1024;
/// Destinations outside the cluster remembered per pod at most (past it, new ones still alert,
/// once per repeat interval, but are not remembered).
const MAX_EGRESS: usize = 1024;
/// A label this long or longer may be random-looking.
const RANDOM_LABEL_MIN_LEN: usize = 20;

#[derive(Debug, Default)]
pub struct Detector {
    config: AlertConfig,
    pods: HashMap<ObjectRef, PodState>,
    last_alert: HashMap<(ObjectRef, AlertKind), Instant>,
}

impl Detector {
    pub fn new(config: AlertConfig) -> Self {
        Detector {
            config,
            ..Default::default()
        }
    }

    pub fn config(&self) -> &AlertConfig {
        &self.config
    }

    /// Takes one observation at `now`; returns the alert it raises, if any.
    pub fn observe(&mut self, now: Instant, obs: Observation<'_>) -> Option<Alert> {
        if !self.config.enabled {
            return None;
        }
        let window = self.config.window();
        let (pod, kind, message) = match obs {
            Observation::Denied {
                src,
                dst,
                port,
                protocol,
            } => {
                let threshold = self.config.scan_destinations;
                let state = self.state(src, now);
                let key = (dst, port, protocol.to_string());
                // Bounded: past the cap a scan is a scan already; new destinations only refresh.
                if state.denied.len() < MAX_DENIED || state.denied.contains_key(&key) {
                    state.denied.insert(key, now);
                }
                state.denied.retain(|_, t| now.duration_since(*t) <= window);
                let distinct = state.denied.len();
                if distinct < threshold {
                    return None;
                }
                let hosts: std::collections::BTreeSet<IpAddr> =
                    state.denied.keys().map(|(ip, _, _)| *ip).collect();
                (
                    src,
                    AlertKind::Scan,
                    format!(
                        "denied connections to {distinct} distinct destinations ({} hosts) within \
                         {}s: a port scan or lateral movement",
                        hosts.len(),
                        window.as_secs()
                    ),
                )
            }
            Observation::Spoofed { pod, detail } => (
                pod,
                AlertKind::Spoofing,
                format!("sent a frame with an address that is not its own ({detail})"),
            ),
            Observation::UntrustedDns {
                pod,
                server,
                qname,
                dropped,
            } => (
                pod,
                AlertKind::DnsUntrusted,
                format!(
                    "queried DNS server {server}, which is not in trustedDns{}{}",
                    qname.map(|q| format!(" (for {q})")).unwrap_or_default(),
                    if dropped {
                        "; dropped"
                    } else {
                        "; let through (monitor)"
                    }
                ),
            ),
            Observation::DnsQuery { pod, qname } => {
                if !looks_random(qname) {
                    return None;
                }
                let min = self.config.dns_random_queries.max(1);
                let state = self.state(pod, now);
                state.random.push_back(now);
                while state
                    .random
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > window)
                {
                    state.random.pop_front();
                }
                while state.random.len() > min {
                    state.random.pop_front();
                }
                state.random_example = qname.to_string();
                if state.random.len() < min {
                    return None;
                }
                (
                    pod,
                    AlertKind::DnsTunnel,
                    format!(
                        "{} sampled queries with long random-looking labels within {}s (e.g. {}): \
                         DNS tunnelling or generated domains",
                        state.random.len(),
                        window.as_secs(),
                        state.random_example
                    ),
                )
            }
            Observation::DnsCounters {
                pod,
                queries,
                nxdomain,
            } => return self.judge_counters(now, pod, queries, nxdomain),
            Observation::NewEgress {
                pod,
                dst,
                port,
                protocol,
            } => {
                let learning = Duration::from_secs(self.config.new_destination_learning_seconds);
                let state = self.state(pod, now);
                let since = *state.egress_since.get_or_insert(now);
                let key = (dst, port, protocol.to_string());
                if state.egress.contains(&key) {
                    return None;
                }
                if state.egress.len() < MAX_EGRESS {
                    state.egress.insert(key);
                }
                if now.duration_since(since) < learning {
                    return None;
                }
                let known = state.egress.len().saturating_sub(1);
                let to = match port {
                    Some(p) if dst.is_ipv6() => format!("[{dst}]:{p}/{protocol}"),
                    Some(p) => format!("{dst}:{p}/{protocol}"),
                    None => format!("{dst} ({protocol})"),
                };
                (
                    pod,
                    AlertKind::NewDestination,
                    format!(
                        "connected to {to} outside the cluster, a destination it did not use in \
                         its {}s learning window ({known} known)",
                        learning.as_secs()
                    ),
                )
            }
        };
        self.raise(now, pod, kind, message)
    }

    /// At most one alert per pod and kind per `repeat_after`.
    fn raise(
        &mut self,
        now: Instant,
        pod: &ObjectRef,
        kind: AlertKind,
        message: String,
    ) -> Option<Alert> {
        let key = (pod.clone(), kind);
        let repeat = self.config.repeat_after();
        if self
            .last_alert
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < repeat)
        {
            return None;
        }
        self.last_alert.insert(key, now);
        if self.last_alert.len() > 4 * MAX_PODS {
            self.last_alert
                .retain(|_, t| now.duration_since(*t) < repeat);
        }
        Some(Alert {
            kind,
            pod: pod.to_string(),
            message,
        })
    }

    /// Closes a pod's DNS window once it has lasted `window`: judges its NXDOMAIN share and its
    /// rate against its baseline.
    fn judge_counters(
        &mut self,
        now: Instant,
        pod: &ObjectRef,
        queries: u64,
        nxdomain: u64,
    ) -> Option<Alert> {
        let window = self.config.window();
        let (min, factor) = (self.config.dns_min_queries, self.config.dns_rate_factor);
        let state = self.state(pod, now);
        let Some((start, q0, n0)) = state.window_start else {
            state.window_start = Some((now, queries, nxdomain));
            return None;
        };
        // Counters restart with the agent or the pod's rules: start a new window.
        if queries < q0 || nxdomain < n0 {
            state.window_start = Some((now, queries, nxdomain));
            return None;
        }
        if now.duration_since(start) < window {
            return None;
        }
        let (dq, dn) = (queries - q0, nxdomain - n0);
        state.window_start = Some((now, queries, nxdomain));
        let baseline = (state.history.len() >= MIN_BASELINE_WINDOWS)
            .then(|| state.history.iter().sum::<u64>() as f64 / state.history.len() as f64);
        state.history.push_back(dq);
        if state.history.len() > BASELINE_WINDOWS {
            state.history.pop_front();
        }
        let secs = window.as_secs();
        if dq >= min && dn * 2 >= dq {
            return self.raise(
                now,
                pod,
                AlertKind::DnsNxdomain,
                format!("{dn} of its {dq} DNS queries in {secs}s were answered NXDOMAIN"),
            );
        }
        if let Some(base) = baseline {
            if dq >= min && dq as f64 > factor * base.max(1.0) {
                return self.raise(
                    now,
                    pod,
                    AlertKind::DnsRate,
                    format!(
                        "{dq} DNS queries in {secs}s, over {factor}× its baseline of {base:.1}"
                    ),
                );
            }
        }
        None
    }

    fn state(&mut self, pod: &ObjectRef, now: Instant) -> &mut PodState {
        if !self.pods.contains_key(pod) && self.pods.len() >= MAX_PODS {
            // Forget the pod seen longest ago (deleted pods end here).
            if let Some(oldest) = self
                .pods
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(k, _)| k.clone())
            {
                self.pods.remove(&oldest);
            }
        }
        let state = self.pods.entry(pod.clone()).or_default();
        state.last_seen = Some(now);
        state
    }
}

/// Shannon entropy of `s`, bits per byte.
fn entropy(s: &[u8]) -> f64 {
    let mut counts = [0u32; 256];
    for &b in s {
        counts[usize::from(b)] += 1;
    }
    let n = s.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

/// Whether any label of `qname` looks random: long, high in entropy, and either rich in digits
/// or poor in vowels (encoded data and generated names are; words and service names are not).
pub fn looks_random(qname: &str) -> bool {
    qname.split('.').any(|label| {
        let b = label.as_bytes();
        if b.len() < RANDOM_LABEL_MIN_LEN || entropy(b) < 3.5 {
            return false;
        }
        let letters = b.iter().filter(|c| c.is_ascii_alphabetic()).count().max(1);
        let digits = b.iter().filter(|c| c.is_ascii_digit()).count();
        let vowels = b.iter().filter(|c| b"aeiouAEIOU".contains(c)).count();
        digits * 100 >= b.len() * 15 || vowels * 100 < letters * 20
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> ObjectRef {
        ObjectRef::new("app", name)
    }

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn a_new_destination_after_the_learning_window_alerts_once_and_learned_ones_never() {
        let mut d = Detector::new(AlertConfig {
            new_destination_learning_seconds: 60,
            ..Default::default()
        });
        let t0 = Instant::now();
        let p = pod("web");
        let egress = |d: &mut Detector, at: Instant, ip: &str, port: u16| {
            d.observe(
                at,
                Observation::NewEgress {
                    pod: &p,
                    dst: ip.parse().unwrap(),
                    port: Some(port),
                    protocol: "TCP",
                },
            )
        };
        // Learning: the first connection starts the window; nothing alerts within it.
        assert_eq!(egress(&mut d, at(t0, 0), "203.0.113.1", 443), None);
        assert_eq!(egress(&mut d, at(t0, 59), "203.0.113.2", 443), None);
        // After it: what was learned is quiet, a new address (or port) alerts.
        assert_eq!(egress(&mut d, at(t0, 61), "203.0.113.1", 443), None);
        let alert = egress(&mut d, at(t0, 62), "198.51.100.7", 22).unwrap();
        assert_eq!(alert.kind, AlertKind::NewDestination);
        assert_eq!(alert.pod, "app/web");
        assert!(
            alert.message.contains("198.51.100.7:22/TCP")
                && alert.message.contains("60s learning window")
                && alert.message.contains("(2 known)"),
            "{}",
            alert.message
        );
        // It is learned now, and a second new one within the repeat interval is not an Event.
        assert_eq!(egress(&mut d, at(t0, 63), "198.51.100.7", 22), None);
        assert_eq!(egress(&mut d, at(t0, 64), "198.51.100.8", 22), None);
        assert!(egress(&mut d, at(t0, 64 + 600), "198.51.100.9", 22).is_some());
        // Another pod has its own window.
        let q = pod("other");
        let first = d.observe(
            at(t0, 700),
            Observation::NewEgress {
                pod: &q,
                dst: "198.51.100.10".parse().unwrap(),
                port: Some(22),
                protocol: "TCP",
            },
        );
        assert_eq!(first, None);
    }

    #[test]
    fn a_scan_raises_one_alert_per_window_and_a_few_denies_none() {
        let mut d = Detector::new(AlertConfig::default());
        let t0 = Instant::now();
        let scanner = pod("scanner");
        let mut alerts = Vec::new();
        for host in 0..10u8 {
            for port in 0..50u16 {
                let obs = Observation::Denied {
                    src: &scanner,
                    dst: IpAddr::from([10, 244, 2, host]),
                    port: Some(1000 + port),
                    protocol: "TCP",
                };
                alerts.extend(d.observe(at(t0, u64::from(host)), obs));
            }
        }
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].kind, AlertKind::Scan);
        assert_eq!(alerts[0].pod, "app/scanner");
        assert!(alerts[0]
            .message
            .contains("20 distinct destinations (1 hosts)"));
        // A pod retrying one denied destination is no scan.
        let retry = pod("retry");
        for s in 0..100 {
            let obs = Observation::Denied {
                src: &retry,
                dst: IpAddr::from([10, 244, 2, 1]),
                port: Some(80),
                protocol: "TCP",
            };
            assert_eq!(d.observe(at(t0, s), obs), None);
        }
        // After repeat_after, a scan that goes on alerts again.
        let again = Observation::Denied {
            src: &scanner,
            dst: IpAddr::from([10, 244, 3, 1]),
            port: Some(1),
            protocol: "TCP",
        };
        assert_eq!(d.observe(at(t0, 30), again.clone()), None);
        for port in 0..25u16 {
            let obs = Observation::Denied {
                src: &scanner,
                dst: IpAddr::from([10, 244, 3, 2]),
                port: Some(port),
                protocol: "TCP",
            };
            if let Some(a) = d.observe(at(t0, 700), obs) {
                alerts.push(a);
            }
        }
        assert_eq!(alerts.len(), 2);
    }

    #[test]
    fn destinations_older_than_the_window_do_not_count() {
        let mut d = Detector::new(AlertConfig::default());
        let t0 = Instant::now();
        let p = pod("slow");
        // 19 distinct destinations a minute and a half apart: never 20 within 60 s.
        for i in 0..60u16 {
            let obs = Observation::Denied {
                src: &p,
                dst: IpAddr::from([10, 244, 2, 1]),
                port: Some(i),
                protocol: "TCP",
            };
            assert_eq!(d.observe(at(t0, u64::from(i) * 4), obs), None, "{i}");
        }
    }

    #[test]
    fn random_labels_are_told_from_words_and_service_names() {
        for random in [
            "k3j9x0qz7w2m5v8n1b4c6d7f8g9h0j.tunnel.example",
            "mzxw6ytboi2dqnrsgq3tmnzyhe4dcmrt.t.example",
            "4f2a9c0e8b7d6a5f4e3d2c1b0a9f8e7d.cdn.example",
        ] {
            assert!(looks_random(random), "{random}");
        }
        for word in [
            "kubernetes-dashboard-metrics-scraper.kube-system.svc.cluster.local",
            "www.example.com",
            "registry-1.docker.io",
            "prometheus-operator-kube-state-metrics.monitoring.svc",
        ] {
            assert!(!looks_random(word), "{word}");
        }
    }

    /// `len` letters and digits from a fixed-seed generator.
    fn pseudo_random_label(seed: u64, len: usize) -> String {
        const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                char::from(CHARS[((x >> 33) % CHARS.len() as u64) as usize])
            })
            .collect()
    }

    #[test]
    fn a_tunnelling_burst_raises_exactly_one_alert() {
        let mut d = Detector::new(AlertConfig::default());
        let t0 = Instant::now();
        let p = pod("tunnel");
        let mut alerts = Vec::new();
        for i in 0..40 {
            let name = format!("{}.t.example", pseudo_random_label(i, 32));
            alerts.extend(d.observe(
                at(t0, i / 4),
                Observation::DnsQuery {
                    pod: &p,
                    qname: &name,
                },
            ));
            alerts.extend(d.observe(
                at(t0, i / 4),
                Observation::DnsQuery {
                    pod: &p,
                    qname: "www.example.com",
                },
            ));
        }
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].kind, AlertKind::DnsTunnel);
    }

    #[test]
    fn nxdomain_share_and_rate_are_judged_per_window_against_the_pods_own_baseline() {
        let mut d = Detector::new(AlertConfig::default());
        let t0 = Instant::now();
        let p = pod("dns");
        let mut counters = |secs: u64, queries: u64, nxdomain: u64| {
            d.observe(
                at(t0, secs),
                Observation::DnsCounters {
                    pod: &p,
                    queries,
                    nxdomain,
                },
            )
        };
        assert_eq!(counters(0, 0, 0), None);
        // Quiet windows: 20 queries a minute, few NXDOMAIN. They make the baseline.
        for w in 1..=4u64 {
            assert_eq!(counters(w * 60, w * 20, w), None, "window {w}");
        }
        // Then 1,000 in a minute: over 10× the baseline of 20.
        let rate = counters(300, 80 + 1000, 4).unwrap();
        assert_eq!(rate.kind, AlertKind::DnsRate);
        assert!(
            rate.message.contains("1000 DNS queries in 60s"),
            "{}",
            rate.message
        );
        // Then 100 queries, 60 of them NXDOMAIN.
        let nx = counters(360, 1080 + 100, 64).unwrap();
        assert_eq!(nx.kind, AlertKind::DnsNxdomain);
        assert!(nx.message.contains("60 of its 100"), "{}", nx.message);
        // Counters that go back (an agent restart) start a new window, never an alert.
        assert_eq!(counters(420, 5, 0), None);
        assert_eq!(counters(480, 10, 0), None);
    }

    #[test]
    fn untrusted_dns_and_spoofing_alert_once_per_repeat_interval() {
        let mut d = Detector::new(AlertConfig::default());
        let t0 = Instant::now();
        let p = pod("x");
        let untrusted = |qname| Observation::UntrustedDns {
            pod: &p,
            server: IpAddr::from([8, 8, 8, 8]),
            qname,
            dropped: true,
        };
        let first = d.observe(t0, untrusted(Some("a.example"))).unwrap();
        assert!(first.message.contains(
            "queried DNS server 8.8.8.8, which is not in trustedDns (for a.example); dropped"
        ));
        assert_eq!(d.observe(at(t0, 10), untrusted(None)), None);
        assert!(d.observe(at(t0, 601), untrusted(None)).is_some());
        let spoof = Observation::Spoofed {
            pod: &p,
            detail: "source 10.244.1.99".into(),
        };
        assert_eq!(
            d.observe(t0, spoof.clone()).map(|a| a.kind),
            Some(AlertKind::Spoofing)
        );
        assert_eq!(d.observe(at(t0, 1), spoof), None);
        let mut off = Detector::new(AlertConfig {
            enabled: false,
            ..Default::default()
        });
        assert_eq!(off.observe(t0, untrusted(None)), None);
    }
}
