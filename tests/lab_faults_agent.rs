//! The agent SIGKILLed at random points of its work, 20 times in a row: in the middle of a
//! reconcile (a peer's encryption mode changed, so routes, FDB and neighbour entries, the wire
//! table and the WireGuard peer set all change) and of a policy sync (a NetworkPolicy and a pod
//! label changed), and half of the times again during the restarted agent's first pass. Each time
//! the restarted agent must converge to exactly the kernel state of the same cluster state
//! reached without a kill, the first of them the lab's clean start: links, addresses, routes of
//! every table, rules, permanent neighbours, the static FDB entries and the whole nft ruleset (counters aside), with
//! no entry leaked or missing. The kill points are drawn from a seed printed by the test. Needs
//! root.
//!
//! Control planes: both (the agent's watches resume against either API server after a kill).

mod common;

use std::time::{Duration, Instant};

use common::*;

/// The two cluster states the test moves between.
#[derive(Clone, Copy, PartialEq, Debug)]
enum ClusterState {
    /// node-2 encrypts; no policy; pod c unlabelled.
    A,
    /// node-2 plaintext (the pair goes VXLAN); a policy lets only `role=client` pods reach a;
    /// pod c labelled `role=client`.
    B,
}

const POLICY: &str = r#"{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy",
 "metadata":{"name":"a-from-clients","namespace":"default"},
 "spec":{"podSelector":{"matchLabels":{"app":"a"}},"policyTypes":["Ingress"],
  "ingress":[{"from":[{"podSelector":{"matchLabels":{"role":"client"}}}]}]}}"#;

/// The first API write towards `to`: node-2's mode (node-1's agent may be dead meanwhile: only
/// the API is written).
fn first_write(lab: &Lab, to: ClusterState) {
    let mode = if to == ClusterState::A { "on" } else { "off" };
    set_mode(lab, "node-2", mode);
}

/// The rest of the writes towards `to`: the policy and pod c's label.
fn other_writes(lab: &Lab, to: ClusterState) {
    match to {
        ClusterState::A => {
            lab.kubectl_ok(&[
                "delete",
                "networkpolicy",
                "a-from-clients",
                "--ignore-not-found",
            ]);
            lab.kubectl_ok(&["label", "pod", "c", "role-"]);
        }
        ClusterState::B => {
            lab.apply(POLICY);
            lab.kubectl_ok(&["label", "pod", "c", "role=client", "--overwrite"]);
        }
    }
}

/// Makes the cluster `to`.
fn move_to(lab: &Lab, to: ClusterState) {
    first_write(lab, to);
    other_writes(lab, to);
}

#[test]
fn an_agent_killed_at_random_points_converges_to_the_state_of_a_clean_start() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("agentkill", &["--nodes", "2"]);
    lab.apply(&pod_manifest(
        "default",
        "a",
        "node-1",
        &[("app", "a")],
        SERVE,
    ));
    lab.apply(&pod_manifest("default", "b", "node-2", &[], SERVE));
    lab.apply(&pod_manifest("default", "c", "node-1", &[], SERVE));
    let a_ip = lab.wait_pod_ip("default/a", Duration::from_secs(60));
    lab.wait_pod_ip("default/b", Duration::from_secs(60));
    lab.wait_pod_ip("default/c", Duration::from_secs(60));
    wait_path(
        &lab,
        "node-1",
        "node-2",
        "wireguard",
        Duration::from_secs(30),
    );

    // The references: A as the lab's clean start left it, B as an unkilled agent reaches it, and
    // A again, which must equal the first (the test itself would be meaningless otherwise).
    let clean_a = settled_kernel_state(&lab, 1);
    move_to(&lab, ClusterState::B);
    wait_path(&lab, "node-1", "node-2", "vxlan", Duration::from_secs(30));
    eventually(
        Duration::from_secs(30),
        "the policy isolates a from b",
        || lab.connect("default/b", &format!("{a_ip}:80"), "tcp", "2s") == Some(1),
    );
    let clean_b = settled_kernel_state(&lab, 1);
    assert_ne!(clean_a, clean_b, "the two cluster states look the same");
    move_to(&lab, ClusterState::A);
    wait_path(
        &lab,
        "node-1",
        "node-2",
        "wireguard",
        Duration::from_secs(30),
    );
    assert_eq!(
        settled_kernel_state(&lab, 1),
        clean_a,
        "an unkilled agent did not come back to the clean state"
    );

    let seed = std::env::var("VEILNET_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("kill points drawn from VEILNET_KILL_SEED={seed}");
    let mut rng = XorShift(seed);
    let mut state = ClusterState::A;
    let mut converged = Vec::new();
    for round in 1..=20 {
        state = if state == ClusterState::A {
            ClusterState::B
        } else {
            ClusterState::A
        };
        // The agent sees each API write within milliseconds and works on it for tens of them:
        // a kill 0–400 ms after the first write lands anywhere in that work.
        let kill_after = Duration::from_millis(rng.below(400));
        let again_after = (rng.below(2) == 0).then(|| Duration::from_millis(rng.below(1500)));
        std::thread::scope(|scope| {
            // Timed from the first write's return, not from a kubectl start.
            first_write(&lab, state);
            let writer = scope.spawn(|| other_writes(&lab, state));
            std::thread::sleep(kill_after);
            lab.kill_daemon("agent-node-1");
            writer.join().expect("the API writes");
            if let Some(after) = again_after {
                // Killed again during the restarted agent's first pass over everything.
                let restart = scope.spawn(|| lab.up_again());
                eventually(Duration::from_secs(30), "the agent restarts", || {
                    lab.daemon_pid("agent-node-1").is_some()
                });
                std::thread::sleep(after);
                lab.kill_daemon("agent-node-1");
                let _ = restart.join();
            }
        });
        let restarted = Instant::now();
        lab.up_again();
        let want = if state == ClusterState::A {
            &clean_a
        } else {
            &clean_b
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = settled_kernel_state(&lab, 1);
            if &now == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round} (seed {seed}, to {state:?}, killed after {kill_after:?}, again \
                 after {again_after:?}): node-1's dataplane differs from a clean start's:\n{}",
                kernel_state_diff(want, &now)
            );
        }
        converged.push(restarted.elapsed());
        eprintln!(
            "round {round:>2}: to {state:?}, killed {kill_after:?} after the first write{}; \
             the same kernel state as a clean start {:.1} s after the restart",
            again_after.map_or(String::new(), |a| format!(", again {a:?} into its restart")),
            restarted.elapsed().as_secs_f64()
        );
    }
    // And the pods' traffic agrees with the final state (A: no policy, encrypted).
    assert_eq!(state, ClusterState::A);
    assert_eq!(
        lab.connect("default/b", &format!("{a_ip}:80"), "tcp", "3s"),
        Some(0)
    );
    let longest = converged.iter().max().unwrap();
    eprintln!(
        "20 kills: converged every time, at most {:.1} s after the restart (settling included)",
        longest.as_secs_f64()
    );
    lab.down();
}
