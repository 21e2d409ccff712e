//! The command line as an operator meets it: help texts, shell completions, the `kubectl veilnet`
//! plugin's dispatch by program name, `verify-ciphertext.sh`'s usage. No root, no cluster; it
//! drives the built binaries (`cargo build --workspace` first, for `veilnet lab exec --help`).

use std::path::Path;
use std::process::{Command, Output};

use veilnet::agent::config::{AgentArgs, AgentConfig};

const VEILNET: &str = env!("CARGO_BIN_EXE_veilnet");

fn run(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .expect("run the binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The help block of one flag: from its `--flag` line to the next flag.
fn flag_block<'a>(help: &'a str, flag: &str) -> &'a str {
    let start = [" ", "["]
        .iter()
        .find_map(|after| help.find(&format!("      --{flag}{after}")))
        .unwrap_or_else(|| panic!("--{flag} not in help:\n{help}"));
    let rest = &help[start + 6..];
    let end = rest[2..].find("\n      --").map_or(rest.len(), |e| e + 2);
    &rest[..end]
}

#[test]
fn agent_help_shows_the_defaults_the_agent_applies() {
    let out = run(VEILNET, &["agent", "--help"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let help = stdout(&out);
    let cfg = AgentConfig::resolve(&AgentArgs {
        node_name: Some("n".into()),
        ..Default::default()
    })
    .expect("defaults resolve");
    let expected = [
        ("namespace", cfg.namespace.clone()),
        ("cluster-cidr", cfg.cluster_cidr.to_string()),
        ("node-cidr-prefix", cfg.node_cidr_prefix.to_string()),
        ("state-dir", cfg.state_dir.display().to_string()),
        ("run-dir", cfg.run_dir.display().to_string()),
        ("cni-conf-dir", cfg.cni_conf_dir.display().to_string()),
        ("cni-bin-dir", cfg.cni_bin_dir.display().to_string()),
        ("vxlan-vni", cfg.vxlan_vni.to_string()),
        ("vxlan-port", cfg.vxlan_port.to_string()),
        ("resync", format!("{}s", cfg.resync.as_secs())),
        ("health-addr", cfg.health_addr.to_string()),
        ("metrics-addr", cfg.metrics_addr.to_string()),
        ("flows-addr", cfg.flows_addr.to_string()),
        ("encryption", "on".to_string()),
        ("wireguard-port", cfg.wireguard_port.to_string()),
        ("policy-strict-mode", cfg.policy_strict_mode.to_string()),
    ];
    for (flag, value) in expected {
        let block = flag_block(&help, flag);
        assert!(
            block.contains(&format!("[default: {value}]")),
            "--{flag} should show [default: {value}]:\n{block}"
        );
    }
    // Flags without a default show none.
    for flag in ["node-name", "kubeconfig", "config"] {
        let block = flag_block(&help, flag);
        assert!(!block.contains("[default:"), "--{flag}:\n{block}");
    }
}

#[test]
fn lab_exec_help_describes_cmd() {
    let out = run(VEILNET, &["lab", "exec", "--help"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let help = stdout(&out);
    let line = help
        .lines()
        .find(|l| l.trim_start().starts_with("<CMD>..."))
        .unwrap_or_else(|| panic!("no <CMD> argument in:\n{help}"));
    assert!(
        line.trim_start()
            .trim_start_matches("<CMD>...")
            .trim()
            .len()
            > 10,
        "<CMD> is undescribed: {line:?}"
    );
}

#[test]
fn completions_bash_and_zsh() {
    for shell in ["bash", "zsh"] {
        let out = run(VEILNET, &["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        for sub in ["status", "agent", "policy", "explain", "lab", "completions"] {
            assert!(script.contains(sub), "{shell} script lacks {sub}");
        }
        if shell == "bash" {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("veilnet.bash");
            std::fs::write(&file, &script).unwrap();
            let check = run("bash", &["-n", file.to_str().unwrap()]);
            assert!(check.status.success(), "bash -n: {}", stderr(&check));
        } else {
            assert!(script.starts_with("#compdef veilnet"), "{script:.80}");
        }
    }
    let bad = run(VEILNET, &["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2));
}

/// The binary linked as `kubectl-veilnet` in a temporary directory, as kubectl finds plugins.
fn plugin() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("kubectl-veilnet");
    std::os::unix::fs::symlink(VEILNET, &link).unwrap();
    (dir, link)
}

#[test]
fn kubectl_plugin_dispatches_on_its_name() {
    let (_dir, kubectl_veilnet) = plugin();
    let out = run(&kubectl_veilnet, &["--help"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let help = stdout(&out);
    assert!(help.contains("Usage: kubectl veilnet"), "{help}");
    for sub in ["status", "explain", "doctor", "observe"] {
        assert!(help.contains(sub), "{sub} missing:\n{help}");
    }
    assert!(help.contains("--context") && help.contains("--kubeconfig"));
    // Not the veilnet command line: it has no `agent`.
    assert!(!help.contains("agent  "), "{help}");

    let out = run(&kubectl_veilnet, &["status", "--help"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Usage: kubectl veilnet status"));

    let out = run(&kubectl_veilnet, &["explain", "--help"]);
    assert!(stdout(&out).contains("PORT/PROTO"), "{}", stdout(&out));

    // The same through the subcommand.
    let out = run(VEILNET, &["kubectl-plugin", "--help"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Usage: kubectl veilnet"));
}

#[test]
fn kubectl_plugin_observe_checks_its_filters_before_it_reads_the_cluster() {
    let (dir, kubectl_veilnet) = plugin();
    let missing = dir.path().join("no-such-kubeconfig");
    let m = missing.to_str().unwrap();
    let out = run(
        &kubectl_veilnet,
        &["--kubeconfig", m, "observe", "--verdict", "maybe"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--verdict: \"maybe\""),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).is_empty());
    // A cluster that cannot be read: a clear error naming the kubeconfig, exit status 2.
    let out = run(&kubectl_veilnet, &["--kubeconfig", m, "observe"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no-such-kubeconfig"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn kubectl_plugin_reads_the_given_kubeconfig() {
    let (dir, kubectl_veilnet) = plugin();
    let missing = dir.path().join("no-such-kubeconfig");
    let m = missing.to_str().unwrap();
    let out = run(&kubectl_veilnet, &["--kubeconfig", m, "status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no-such-kubeconfig"),
        "{}",
        stderr(&out)
    );
    // explain checks its arguments as `veilnet policy explain` does, before any API call.
    let out = run(
        &kubectl_veilnet,
        &["explain", "--kubeconfig", m, "a/b", "c/d", "0/tcp"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not a port number"),
        "{}",
        stderr(&out)
    );
    // A context the kubeconfig lacks is refused, naming it.
    let kc = dir.path().join("kubeconfig");
    std::fs::write(
        &kc,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:1'}\n\
         users:\n- name: u\n  user: {token: t}\ncontexts:\n- name: ctx\n  context: {cluster: c, user: u}\n\
         current-context: ctx\n",
    )
    .unwrap();
    let out = run(
        &kubectl_veilnet,
        &[
            "--kubeconfig",
            kc.to_str().unwrap(),
            "--context",
            "other",
            "status",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("other"), "{}", stderr(&out));
}

#[test]
fn verify_ciphertext_usage() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/verify-ciphertext.sh");
    for args in [&[][..], &["--lab"][..], &["a", "b"][..], &["--help"][..]] {
        let out = Command::new("bash")
            .arg(&script)
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.starts_with("usage: scripts/verify-ciphertext.sh [--lab NAME] FROM TO"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("set -euo") && !err.contains("#"), "{err}");
    }
}

/// Output into a pipe whose reader is already gone (`veilnet … | head -1`): no panic, no
/// "broken pipe" noise; the command's own exit status.
fn run_into_closed_pipe(program: &str, args: &[&str]) -> Output {
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::from(writer))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn a_closed_pipe_is_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().display().to_string();
    // doctor with no agent: its report, then exit 1 for the FAIL, not 101 for a panic.
    let out = run_into_closed_pipe(VEILNET, &["doctor", "--run-dir", &run_dir, "--no-probe"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    let out = run_into_closed_pipe(VEILNET, &["completions", "bash"]);
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}
