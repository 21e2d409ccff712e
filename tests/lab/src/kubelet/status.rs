//! Pod status from what the node observed (pure): phase, IPs, conditions and container statuses,
//! following the kubelet's `getPhase` / `generateAPIPodStatus` rules.

use std::net::IpAddr;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Condition types this kubelet owns (others, e.g. readiness gates, are left as they are).
pub const OWNED_CONDITIONS: &[&str] = &[
    "PodReadyToStartContainers",
    "Initialized",
    "ContainersReady",
    "Ready",
    "PodScheduled",
];

/// How a container ended.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Termination {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub reason: String,
    pub message: Option<String>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Timestamp,
    pub container_id: Option<String>,
}

/// The runtime's view of one container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuntimeState {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Timestamp,
    },
    Terminated(Termination),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerView {
    pub name: String,
    pub image: String,
    pub state: RuntimeState,
    pub last_termination: Option<Termination>,
    pub restart_count: u32,
    pub container_id: Option<String>,
    /// Readiness (probe result, or running when there is no probe).
    pub ready: bool,
}

/// Everything the status is computed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    pub restart_policy: String,
    pub sandbox_ready: bool,
    pub pod_ips: Vec<IpAddr>,
    pub host_ip: String,
    pub containers: Vec<ContainerView>,
    pub init_containers: Vec<ContainerView>,
    pub init: InitProgress,
    /// Pod-level failure to show (e.g. an invalid spec), with its reason.
    pub failure: Option<(String, String)>,
}

/// Where the init containers are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitProgress {
    /// All completed (or there are none): the containers run.
    Done,
    /// Still running through them.
    Pending,
    /// One failed and will not be retried (`restartPolicy: Never`).
    Failed,
}

/// The pod phase (kubelet `getPhase`).
pub fn pod_phase(
    restart_policy: &str,
    init: InitProgress,
    containers: &[ContainerView],
) -> &'static str {
    match init {
        InitProgress::Failed => return "Failed",
        InitProgress::Pending => return "Pending",
        InitProgress::Done => {}
    }
    if containers.is_empty() {
        return "Pending";
    }
    let (mut running, mut stopped, mut succeeded, mut waiting) = (0, 0, 0, 0);
    for c in containers {
        match &c.state {
            RuntimeState::Running { .. } => running += 1,
            RuntimeState::Terminated(t) => {
                stopped += 1;
                if t.exit_code == 0 {
                    succeeded += 1;
                }
            }
            // Waiting after an earlier run is a restart in progress: it counts as stopped.
            RuntimeState::Waiting { .. } if c.last_termination.is_some() => stopped += 1,
            RuntimeState::Waiting { .. } => waiting += 1,
        }
    }
    if waiting > 0 {
        "Pending"
    } else if running > 0 {
        "Running"
    } else if stopped == containers.len() {
        match restart_policy {
            "Always" => "Running",
            _ if stopped == succeeded => "Succeeded",
            "Never" => "Failed",
            _ => "Running",
        }
    } else {
        "Pending"
    }
}

/// True if the phase will not change any more (no container is restarted from here on).
pub fn is_terminal(phase: &str) -> bool {
    matches!(phase, "Succeeded" | "Failed")
}

fn condition(
    type_: &str,
    ok: bool,
    reason: Option<&str>,
    message: Option<String>,
    now: &Timestamp,
    previous: Option<&PodCondition>,
) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let transition = match previous {
        Some(p) if p.status == status && p.last_transition_time.is_some() => {
            p.last_transition_time.clone()
        }
        _ => Some(Time(*now)),
    };
    PodCondition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.map(str::to_string),
        message,
        last_transition_time: transition,
        ..Default::default()
    }
}

fn terminated(t: &Termination) -> ContainerStateTerminated {
    ContainerStateTerminated {
        exit_code: t.exit_code,
        signal: t.signal,
        reason: Some(t.reason.clone()),
        message: t.message.clone(),
        started_at: t.started_at.map(Time),
        finished_at: Some(Time(t.finished_at)),
        container_id: t.container_id.clone(),
    }
}

fn container_status(c: &ContainerView) -> ContainerStatus {
    let state = match &c.state {
        RuntimeState::Waiting { reason, message } => ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: message.clone(),
            }),
            ..Default::default()
        },
        RuntimeState::Running { started_at } => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(*started_at)),
            }),
            ..Default::default()
        },
        RuntimeState::Terminated(t) => ContainerState {
            terminated: Some(terminated(t)),
            ..Default::default()
        },
    };
    let running = matches!(c.state, RuntimeState::Running { .. });
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: String::new(),
        ready: c.ready && running,
        started: Some(running),
        restart_count: i32::try_from(c.restart_count).unwrap_or(i32::MAX),
        container_id: c.container_id.clone(),
        state: Some(state),
        last_state: c.last_termination.as_ref().map(|t| ContainerState {
            terminated: Some(terminated(t)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// QoS class of a pod from its resources (the API server normally sets it at creation).
pub fn qos_class(pod: &Pod) -> &'static str {
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or(&[]);
    let mut any = false;
    let mut guaranteed = !containers.is_empty();
    for c in containers {
        let res = c.resources.as_ref();
        let requests = res.and_then(|r| r.requests.as_ref());
        let limits = res.and_then(|r| r.limits.as_ref());
        if requests.is_some_and(|r| !r.is_empty()) || limits.is_some_and(|l| !l.is_empty()) {
            any = true;
        }
        for key in ["cpu", "memory"] {
            let limit = limits.and_then(|l| l.get(key));
            let request = requests.and_then(|r| r.get(key)).or(limit);
            if limit.is_none() || request != limit {
                guaranteed = false;
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

/// The status to report. `previous` is the pod's current status: its start time and the
/// transition times of unchanged conditions are kept, and conditions owned by others survive.
pub fn build_status(
    pod: &Pod,
    view: &PodView,
    previous: Option<&PodStatus>,
    now: Timestamp,
) -> PodStatus {
    let prev_cond = |t: &str| {
        previous
            .and_then(|p| p.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == t))
    };
    let mut containers: Vec<&ContainerView> = view.containers.iter().collect();
    containers.sort_by(|a, b| a.name.cmp(&b.name));
    let phase = match &view.failure {
        Some(_)
            if view
                .containers
                .iter()
                .all(|c| matches!(c.state, RuntimeState::Waiting { .. })) =>
        {
            "Pending"
        }
        _ => pod_phase(&view.restart_policy, view.init, &view.containers),
    };
    let unready: Vec<&str> = containers
        .iter()
        .filter(|c| !(c.ready && matches!(c.state, RuntimeState::Running { .. })))
        .map(|c| c.name.as_str())
        .collect();
    let all_ready = unready.is_empty() && !containers.is_empty();
    let (ready_reason, ready_message) = if all_ready {
        (None, None)
    } else if is_terminal(phase) {
        (Some("PodCompleted"), None)
    } else {
        (
            Some("ContainersNotReady"),
            Some(format!(
                "containers with unready status: [{}]",
                unready.join(" ")
            )),
        )
    };
    let mut conditions = vec![
        condition(
            "PodReadyToStartContainers",
            view.sandbox_ready,
            None,
            None,
            &now,
            prev_cond("PodReadyToStartContainers"),
        ),
        {
            let incomplete: Vec<&str> = view
                .init_containers
                .iter()
                .filter(|c| match &c.state {
                    RuntimeState::Terminated(t) => t.exit_code != 0,
                    RuntimeState::Running { .. } => !c.ready,
                    RuntimeState::Waiting { .. } => true,
                })
                .map(|c| c.name.as_str())
                .collect();
            let done = view.init == InitProgress::Done;
            condition(
                "Initialized",
                done,
                (!done).then_some("ContainersNotInitialized"),
                (!done).then(|| {
                    format!(
                        "containers with incomplete status: [{}]",
                        incomplete.join(" ")
                    )
                }),
                &now,
                prev_cond("Initialized"),
            )
        },
        condition(
            "Ready",
            all_ready,
            ready_reason,
            ready_message.clone(),
            &now,
            prev_cond("Ready"),
        ),
        condition(
            "ContainersReady",
            all_ready,
            ready_reason,
            ready_message,
            &now,
            prev_cond("ContainersReady"),
        ),
        condition(
            "PodScheduled",
            true,
            None,
            None,
            &now,
            prev_cond("PodScheduled"),
        ),
    ];
    if let Some(prev) = previous.and_then(|p| p.conditions.as_ref()) {
        conditions.extend(
            prev.iter()
                .filter(|c| !OWNED_CONDITIONS.contains(&c.type_.as_str()))
                .cloned(),
        );
    }
    let pod_ips: Vec<PodIP> = view
        .pod_ips
        .iter()
        .map(|ip| PodIP { ip: ip.to_string() })
        .collect();
    let start_time = previous
        .and_then(|p| p.start_time.clone())
        .unwrap_or(Time(now));
    PodStatus {
        phase: Some(phase.to_string()),
        conditions: Some(conditions),
        host_ip: Some(view.host_ip.clone()),
        host_ips: Some(vec![HostIP {
            ip: view.host_ip.clone(),
        }]),
        pod_ip: pod_ips.first().map(|p| p.ip.clone()),
        pod_ips: (!pod_ips.is_empty()).then_some(pod_ips),
        start_time: Some(start_time),
        container_statuses: Some(containers.iter().map(|c| container_status(c)).collect()),
        // In spec order (their order means something), unlike containers.
        init_container_statuses: (!view.init_containers.is_empty())
            .then(|| view.init_containers.iter().map(container_status).collect()),
        qos_class: Some(
            previous
                .and_then(|p| p.qos_class.clone())
                .unwrap_or_else(|| qos_class(pod).to_string()),
        ),
        reason: view.failure.as_ref().map(|(r, _)| r.clone()),
        message: view.failure.as_ref().map(|(_, m)| m.clone()),
        ..Default::default()
    }
}

/// The body of a merge patch of `pods/status`. Unset fields are sent as null, so that e.g. a stale
/// `message` is removed.
pub fn status_patch(status: &PodStatus) -> serde_json::Value {
    let mut value = serde_json::to_value(status).unwrap_or_default();
    if let Some(obj) = value.as_object_mut() {
        for key in ["podIP", "podIPs", "reason", "message"] {
            obj.entry(key).or_insert(serde_json::Value::Null);
        }
    }
    serde_json::json!({ "status": value })
}

/// Compares two statuses ignoring condition transition times (for "did anything change").
pub fn same_status(a: &PodStatus, b: &PodStatus) -> bool {
    let strip = |s: &PodStatus| {
        let mut s = s.clone();
        for c in s.conditions.iter_mut().flatten() {
            c.last_transition_time = None;
            c.last_probe_time = None;
        }
        s
    };
    strip(a) == strip(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn view(name: &str, state: RuntimeState, last: Option<Termination>) -> ContainerView {
        ContainerView {
            name: name.into(),
            image: "img".into(),
            state,
            last_termination: last,
            restart_count: 0,
            container_id: Some("veilnet-lab://42".into()),
            ready: true,
        }
    }

    fn exited(code: i32) -> Termination {
        Termination {
            exit_code: code,
            signal: None,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            message: None,
            started_at: Some(ts(0)),
            finished_at: ts(5),
            container_id: None,
        }
    }

    fn waiting(reason: &str) -> RuntimeState {
        RuntimeState::Waiting {
            reason: reason.into(),
            message: None,
        }
    }

    #[test]
    fn phases_follow_the_kubelet_rules() {
        let running = view("a", RuntimeState::Running { started_at: ts(0) }, None);
        let ok = view("b", RuntimeState::Terminated(exited(0)), None);
        let bad = view("c", RuntimeState::Terminated(exited(1)), None);
        let creating = view("d", waiting("ContainerCreating"), None);
        let backoff = view("e", waiting("CrashLoopBackOff"), Some(exited(1)));

        assert_eq!(
            pod_phase(
                "Always",
                InitProgress::Done,
                std::slice::from_ref(&creating)
            ),
            "Pending"
        );
        assert_eq!(
            pod_phase("Always", InitProgress::Done, &[running.clone(), creating]),
            "Pending"
        );
        assert_eq!(
            pod_phase("Always", InitProgress::Done, &[running.clone(), ok.clone()]),
            "Running"
        );
        assert_eq!(
            pod_phase("Always", InitProgress::Done, std::slice::from_ref(&backoff)),
            "Running"
        );
        assert_eq!(
            pod_phase("Always", InitProgress::Done, std::slice::from_ref(&ok)),
            "Running"
        );
        assert_eq!(
            pod_phase("Never", InitProgress::Done, std::slice::from_ref(&ok)),
            "Succeeded"
        );
        assert_eq!(
            pod_phase("Never", InitProgress::Done, &[ok.clone(), bad.clone()]),
            "Failed"
        );
        assert_eq!(
            pod_phase("OnFailure", InitProgress::Done, std::slice::from_ref(&ok)),
            "Succeeded"
        );
        assert_eq!(
            pod_phase("OnFailure", InitProgress::Done, &[ok, bad]),
            "Running"
        );
        assert_eq!(
            pod_phase("OnFailure", InitProgress::Done, &[backoff]),
            "Running"
        );
        assert_eq!(pod_phase("Never", InitProgress::Done, &[]), "Pending");
    }

    fn pod_view(containers: Vec<ContainerView>) -> PodView {
        PodView {
            restart_policy: "Always".into(),
            sandbox_ready: true,
            pod_ips: vec!["fd00::5".parse().unwrap(), "10.1.0.5".parse().unwrap()],
            host_ip: "172.30.0.11".into(),
            containers,
            init_containers: Vec::new(),
            init: InitProgress::Done,
            failure: None,
        }
    }

    #[test]
    fn running_pod_status() {
        let mut unready = view("b", RuntimeState::Running { started_at: ts(1) }, None);
        unready.ready = false;
        let v = pod_view(vec![
            view("a", RuntimeState::Running { started_at: ts(1) }, None),
            unready,
        ]);
        let s = build_status(&Pod::default(), &v, None, ts(2));
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(s.pod_ip.as_deref(), Some("fd00::5"));
        assert_eq!(s.host_ips.unwrap()[0].ip, "172.30.0.11");
        assert_eq!(s.start_time, Some(Time(ts(2))));
        let conds = s.conditions.unwrap();
        let ready = conds.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason.as_deref(), Some("ContainersNotReady"));
        assert_eq!(
            ready.message.as_deref(),
            Some("containers with unready status: [b]")
        );
        let statuses = s.container_statuses.unwrap();
        assert_eq!(statuses[0].name, "a");
        assert!(statuses[0].ready);
        assert_eq!(statuses[0].started, Some(true));
        assert_eq!(
            statuses[0].container_id.as_deref(),
            Some("veilnet-lab://42")
        );
        assert!(!statuses[1].ready);
        assert_eq!(s.qos_class.as_deref(), Some("BestEffort"));
    }

    #[test]
    fn transition_times_and_foreign_conditions_are_kept() {
        let v = pod_view(vec![view(
            "a",
            RuntimeState::Running { started_at: ts(1) },
            None,
        )]);
        let mut first = build_status(&Pod::default(), &v, None, ts(2));
        first.conditions.as_mut().unwrap().push(PodCondition {
            type_: "example.com/gate".into(),
            status: "True".into(),
            ..Default::default()
        });
        let second = build_status(&Pod::default(), &v, Some(&first), ts(10));
        let ready = |s: &PodStatus| {
            s.conditions
                .as_ref()
                .unwrap()
                .iter()
                .find(|c| c.type_ == "Ready")
                .unwrap()
                .clone()
        };
        assert_eq!(ready(&second).last_transition_time, Some(Time(ts(2))));
        assert_eq!(second.start_time, Some(Time(ts(2))));
        assert!(second
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .any(|c| c.type_ == "example.com/gate"));
        assert!(same_status(&first, &second));

        let mut v2 = v.clone();
        v2.containers[0].ready = false;
        let third = build_status(&Pod::default(), &v2, Some(&second), ts(20));
        assert_eq!(ready(&third).last_transition_time, Some(Time(ts(20))));
        assert!(!same_status(&second, &third));
    }

    #[test]
    fn pending_pod_without_sandbox_has_no_ip() {
        let mut v = pod_view(vec![view("a", waiting("ContainerCreating"), None)]);
        v.sandbox_ready = false;
        v.pod_ips.clear();
        let s = build_status(&Pod::default(), &v, None, ts(0));
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        assert_eq!(s.pod_ip, None);
        let patch = status_patch(&s);
        assert!(patch["status"]["podIP"].is_null());
        assert!(patch["status"].as_object().unwrap().contains_key("podIP"));
        let c = s.conditions.unwrap();
        let p = c
            .iter()
            .find(|c| c.type_ == "PodReadyToStartContainers")
            .unwrap();
        assert_eq!(p.status, "False");
    }

    #[test]
    fn init_containers_gate_the_phase_and_the_initialized_condition() {
        let running = view("app", RuntimeState::Running { started_at: ts(0) }, None);
        assert_eq!(
            pod_phase(
                "Always",
                InitProgress::Pending,
                std::slice::from_ref(&running)
            ),
            "Pending"
        );
        assert_eq!(pod_phase("Never", InitProgress::Failed, &[]), "Failed");

        let mut v = pod_view(vec![view("app", waiting("PodInitializing"), None)]);
        v.init = InitProgress::Pending;
        v.init_containers = vec![
            view("setup", RuntimeState::Terminated(exited(0)), None),
            view("migrate", RuntimeState::Running { started_at: ts(1) }, None),
        ];
        v.init_containers[1].ready = false;
        let s = build_status(&Pod::default(), &v, None, ts(2));
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let c = s.conditions.as_ref().unwrap();
        let init = c.iter().find(|c| c.type_ == "Initialized").unwrap();
        assert_eq!(init.status, "False");
        assert_eq!(init.reason.as_deref(), Some("ContainersNotInitialized"));
        assert_eq!(
            init.message.as_deref(),
            Some("containers with incomplete status: [migrate]")
        );
        let inits = s.init_container_statuses.unwrap();
        assert_eq!(inits[0].name, "setup");
        assert_eq!(inits[1].name, "migrate");
    }

    #[test]
    fn completed_pod_reports_pod_completed() {
        let mut v = pod_view(vec![view("a", RuntimeState::Terminated(exited(0)), None)]);
        v.restart_policy = "Never".into();
        let s = build_status(&Pod::default(), &v, None, ts(0));
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
        let c = s.conditions.unwrap();
        let ready = c.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.reason.as_deref(), Some("PodCompleted"));
        let st = &s.container_statuses.unwrap()[0];
        assert_eq!(
            st.state
                .as_ref()
                .unwrap()
                .terminated
                .as_ref()
                .unwrap()
                .reason
                .as_deref(),
            Some("Completed")
        );
    }
}
