//! A node's disk fails under it (#17 §1). Node-1's IPAM store (`<state>/ipam/veilnet`) is first
//! full (a small tmpfs over it, filled up), then read-only (a read-only bind mount over it), while
//! pods are added and deleted there; then node-1's WireGuard key directory is read-only while a
//! key rotation is asked of node-1 and node-2 rotates its own key.
//!
//! Each time the failure is clear where an operator looks (the pod's `FailedCreatePodSandBox`
//! Event names the path and the OS error; for the key a Warning Event, `veilnet status` and the
//! agent's log), no record is torn, changed or left behind, traffic between the running pods goes
//! on, the rest of the agent's work goes on (node-2's new key is taken while node-1's own rotation
//! is refused: without that, node-2's new session could never be set up), and everything recovers
//! once the disk takes writes again, with no daemon restarted. The times to recover are printed.
//! Needs root.
//!
//! Control plane: stand-in only, because the faults are in a node's own disk, which neither
//! control plane reads or writes: the same agent, plugin and kubelet run on both.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A mount over `target`, undone on drop (lazily: a plugin caught inside must not keep it).
struct Mounted {
    target: PathBuf,
}

impl Mounted {
    fn mount(args: &[&str], target: &Path) -> Mounted {
        let out = Command::new("mount")
            .args(args)
            .arg(target)
            .output()
            .expect("spawn mount");
        assert!(
            out.status.success(),
            "mount {args:?} {}: {}",
            target.display(),
            text(&out)
        );
        Mounted {
            target: target.to_path_buf(),
        }
    }

    /// `dir` made read-only in place: a bind mount of itself, remounted read-only (one mount:
    /// unmounting it makes `dir` writable again).
    fn read_only(dir: &Path) -> Mounted {
        let bind = Mounted::mount(&["--bind", &dir.to_string_lossy()], dir);
        let out = Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(dir)
            .output()
            .expect("spawn mount");
        assert!(out.status.success(), "remount read-only: {}", text(&out));
        bind
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.target).status();
    }
}

/// A small tmpfs over `dir` holding a copy of its files, then filled to the last page.
/// [`FullDir::restore`] copies what the tmpfs holds back to the disk below it.
struct FullDir {
    dir: PathBuf,
    mount: Option<Mounted>,
}

const FILLER: &str = "zz-filler";

impl FullDir {
    fn over(dir: &Path) -> FullDir {
        let saved = files(dir);
        let mount = Mounted::mount(
            &[
                "-t",
                "tmpfs",
                "-o",
                "size=256k,mode=0755",
                "veilnet-test-full",
            ],
            dir,
        );
        for (name, bytes) in &saved {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        let full = FullDir {
            dir: dir.to_path_buf(),
            mount: Some(mount),
        };
        full.fill();
        full
    }

    /// Writes the filler until the tmpfs has no page left.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.dir.join(FILLER)).unwrap();
        let page = [0u8; 4096];
        let err = loop {
            if let Err(e) = f.write_all(&page).and_then(|()| f.sync_all()) {
                break e;
            }
        };
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    }

    fn make_room(&self) {
        std::fs::remove_file(self.dir.join(FILLER)).unwrap();
    }

    /// Unmounts the tmpfs and writes its files to the directory below, so the disk's store is the
    /// store the plugin kept while the tmpfs was there.
    fn restore(mut self) {
        let mut now = files(&self.dir);
        now.remove(FILLER);
        drop(self.mount.take());
        eventually(Duration::from_secs(5), "the tmpfs unmounted", || {
            !mounted_at(&self.dir)
        });
        for name in files(&self.dir).keys() {
            if !now.contains_key(name) {
                std::fs::remove_file(self.dir.join(name)).unwrap();
            }
        }
        for (name, bytes) in &now {
            std::fs::write(self.dir.join(name), bytes).unwrap();
        }
    }
}

fn mounted_at(dir: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*dir.to_string_lossy()))
}

/// The plain files directly in `dir`: name → content.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap_or_default())
        })
        .collect()
}

/// The address records of an IPAM store (files named by address) with their content.
fn records(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    files(dir)
        .into_iter()
        .filter(|(name, _)| name.parse::<std::net::IpAddr>().is_ok())
        .collect()
}

/// Temporary files of the atomic writer (`.tmp.*`) anywhere under `dir`.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(e.path());
            } else if e.file_name().to_string_lossy().starts_with(".tmp.") {
                out.push(e.path());
            }
        }
    }
    out
}

/// Messages of the Events with `reason` about the object named `name`.
fn events(lab: &Lab, name: &str, reason: &str) -> Vec<String> {
    lab.kubectl_json(&["get", "events", "-A"])["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["involvedObject"]["name"] == name && e["reason"] == reason)
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn wait_event(lab: &Lab, name: &str, reason: &str, containing: &str) -> String {
    let mut found = String::new();
    eventually(
        Duration::from_secs(30),
        &format!("a {reason} Event for {name} saying {containing:?}"),
        || match events(lab, name, reason)
            .into_iter()
            .find(|m| m.contains(containing))
        {
            Some(m) => {
                found = m;
                true
            }
            None => false,
        },
    );
    found
}

fn phase(lab: &Lab, pod: &str) -> String {
    let out = lab.kubectl(&["get", "pod", pod, "-o", "json"]);
    if !out.status.success() {
        return "gone".into();
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["status"]["phase"].as_str().unwrap_or("").to_string()
}

fn talks(lab: &Lab, from: &str, ip: &str) -> bool {
    lab.connect(from, &format!("{ip}:80"), "tcp", "2s") == Some(0)
}

#[test]
fn a_full_or_read_only_state_dir_fails_clearly_loses_nothing_and_recovers() {
    veilnet_test_support::require_root!();
    let lab = Lab::up("disk", &["--nodes", "2", "--control-plane", "stand-in"]);
    let state = PathBuf::from("/var/lib/veilnet-lab")
        .join(&lab.name)
        .join("nodes/node-1/state");
    let ipam = state.join("ipam/veilnet");
    lab.apply(&pod_manifest("default", "a", "node-1", &[], SERVE));
    lab.apply(&pod_manifest("default", "b", "node-2", &[], SERVE));
    let ip_a = lab.wait_pod_ip("default/a", Duration::from_secs(60));
    let ip_b = lab.wait_pod_ip("default/b", Duration::from_secs(60));
    eventually(Duration::from_secs(20), "a <-> b", || {
        talks(&lab, "default/a", &ip_b) && talks(&lab, "default/b", &ip_a)
    });
    let pids: Vec<_> = ["agent-node-1", "datapath-node-1", "kubelet-node-1"]
        .iter()
        .map(|r| lab.daemon_pid(r))
        .collect();
    assert!(ipam.is_dir(), "{} missing", ipam.display());
    let mut figures = Vec::new();

    // ---- 1. The IPAM store full.
    let before = records(&ipam);
    assert!(before.contains_key(&ip_a), "a's record in {before:?}");
    let full = FullDir::over(&ipam);
    let started = Instant::now();
    lab.apply(&pod_manifest("default", "c", "node-1", &[], SERVE));
    let msg = wait_event(
        &lab,
        "c",
        "FailedCreatePodSandBox",
        "No space left on device",
    );
    assert!(
        msg.contains(&*ipam.to_string_lossy()),
        "names the store: {msg}"
    );
    figures.push(format!(
        "IPAM store full: the ADD failed in {:.1} s: {msg}",
        started.elapsed().as_secs_f64()
    ));
    std::thread::sleep(Duration::from_secs(2));
    assert_ne!(phase(&lab, "c"), "Running");
    let mut during = records(&ipam);
    during.remove(FILLER);
    assert_eq!(during, before, "no record added, changed or torn");
    assert!(temporaries(&ipam).is_empty(), "{:?}", temporaries(&ipam));
    assert!(talks(&lab, "default/a", &ip_b), "running pods keep talking");
    full.make_room();
    let freed = Instant::now();
    let ip_c = lab.wait_pod_ip("default/c", Duration::from_secs(60));
    figures.push(format!(
        "IPAM store full: pod up {:.1} s after space returned",
        freed.elapsed().as_secs_f64()
    ));
    assert_ne!(ip_c, ip_a);
    assert!(records(&ipam).contains_key(&ip_c), "c's record");
    eventually(Duration::from_secs(20), "c -> b", || {
        talks(&lab, "default/c", &ip_b)
    });
    full.restore();
    assert_eq!(
        records(&ipam).keys().collect::<Vec<_>>(),
        {
            let mut v = vec![&ip_a, &ip_c];
            v.sort();
            v
        },
        "the disk's store after the tmpfs"
    );

    // ---- 2. The IPAM store read-only: an ADD and a DEL.
    let before = records(&ipam);
    let ro = Mounted::read_only(&ipam);
    let started = Instant::now();
    lab.apply(&pod_manifest("default", "d", "node-1", &[], SERVE));
    let msg = wait_event(&lab, "d", "FailedCreatePodSandBox", "Read-only file system");
    figures.push(format!(
        "IPAM store read-only: the ADD failed in {:.1} s: {msg}",
        started.elapsed().as_secs_f64()
    ));
    lab.kubectl_ok(&["delete", "pod", "c", "--wait=false"]);
    // The DEL cannot release c's address: it stays recorded (not lost, not given twice).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        records(&ipam),
        before,
        "nothing changed under a read-only store"
    );
    assert_ne!(phase(&lab, "d"), "Running");
    assert!(talks(&lab, "default/a", &ip_b), "running pods keep talking");
    drop(ro);
    let writable = Instant::now();
    let ip_d = lab.wait_pod_ip("default/d", Duration::from_secs(60));
    eventually(Duration::from_secs(60), "c deleted and released", || {
        phase(&lab, "c") == "gone" && !records(&ipam).contains_key(&ip_c)
    });
    figures.push(format!(
        "IPAM store read-only: pod up and the deleted pod's address released {:.1} s after it was writable",
        writable.elapsed().as_secs_f64()
    ));
    let mut want = vec![ip_a.clone(), ip_d.clone()];
    want.sort();
    assert_eq!(
        records(&ipam).into_keys().collect::<Vec<_>>(),
        want,
        "records = live pods"
    );
    eventually(Duration::from_secs(20), "d -> b", || {
        talks(&lab, "default/d", &ip_b)
    });

    // ---- 3. The key directory read-only during a rotation of node-1, while node-2 rotates.
    let key_dir = state.join("wireguard");
    let key_file = key_dir.join("private.key");
    let key_bytes = std::fs::read(&key_file).unwrap();
    let key_1 = lab.annotation("node-1", "veilnet.io/wg-public-key");
    let key_2 = lab.annotation("node-2", "veilnet.io/wg-public-key");
    let log_before = lab.agent_log("node-1").len();
    let ro = Mounted::read_only(&key_dir);
    let started = Instant::now();
    lab.kubectl_ok(&[
        "annotate",
        "node",
        "node-1",
        "veilnet.io/rotate-key=disk-1",
        "--overwrite",
    ]);
    let msg = wait_event(
        &lab,
        "node-1",
        "VeilnetKeyRotationFailed",
        "Read-only file system",
    );
    figures.push(format!(
        "key dir read-only: the rotation refused in {:.1} s: {msg}",
        started.elapsed().as_secs_f64()
    ));
    let st = node_status(&lab, "node-1");
    let shown = st["keyRotationError"].as_str().unwrap_or_default();
    assert!(shown.contains("Read-only file system"), "{st:#}");
    // Node-2 rotates meanwhile: node-1 must take its new key, or node-2's session never moves.
    let switched = (
        rotation_switches(&lab, "node-1"),
        rotation_switches(&lab, "node-2"),
    );
    lab.kubectl_ok(&[
        "annotate",
        "node",
        "node-2",
        "veilnet.io/rotate-key=disk-2",
        "--overwrite",
    ]);
    eventually(
        Duration::from_secs(15),
        "node-2's new key published",
        || lab.annotation("node-2", "veilnet.io/wg-public-key") != key_2,
    );
    eventually(
        Duration::from_secs(20),
        "both datapaths on node-2's new session",
        || {
            rotation_switches(&lab, "node-1") > switched.0
                && rotation_switches(&lab, "node-2") > switched.1
        },
    );
    assert!(talks(&lab, "default/a", &ip_b) && talks(&lab, "default/b", &ip_a));
    assert_eq!(lab.annotation("node-1", "veilnet.io/wg-public-key"), key_1);
    assert_eq!(
        std::fs::read(&key_file).unwrap(),
        key_bytes,
        "key untouched"
    );
    let warned = lab.agent_log("node-1")[log_before..].to_string();
    assert!(
        warned.contains("WireGuard key rotation failed; keeping the current key"),
        "{warned}"
    );
    assert!(
        !warned.contains(" ERROR "),
        "a refused rotation is no failed pass:\n{warned}"
    );
    drop(ro);
    let writable = Instant::now();
    eventually(
        Duration::from_secs(20),
        "node-1's new key published",
        || lab.annotation("node-1", "veilnet.io/wg-public-key") != key_1,
    );
    figures.push(format!(
        "key dir read-only: rotated {:.1} s after it was writable",
        writable.elapsed().as_secs_f64()
    ));
    assert_ne!(
        std::fs::read(&key_file).unwrap(),
        key_bytes,
        "the new key on disk"
    );
    assert_eq!(
        std::fs::read_to_string(key_dir.join("rotation-handled")).unwrap(),
        "disk-1"
    );
    assert!(!events(&lab, "node-1", "VeilnetKeyRotated").is_empty());
    eventually(Duration::from_secs(10), "the error cleared", || {
        node_status(&lab, "node-1")
            .get("keyRotationError")
            .is_none()
    });
    eventually(
        Duration::from_secs(20),
        "a <-> b after the rotation",
        || talks(&lab, "default/a", &ip_b) && talks(&lab, "default/b", &ip_a),
    );

    // Nothing restarted, no temporary file left anywhere in the state dir.
    let after: Vec<_> = ["agent-node-1", "datapath-node-1", "kubelet-node-1"]
        .iter()
        .map(|r| lab.daemon_pid(r))
        .collect();
    assert_eq!(after, pids, "no daemon restarted");
    assert!(temporaries(&state).is_empty(), "{:?}", temporaries(&state));
    for f in &figures {
        eprintln!("disk faults: {f}");
    }
}
