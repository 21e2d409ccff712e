//! The CNI configuration directory, read as containerd and CRI-O read it: the `*.conf`,
//! `*.conflist` and `*.json` files in lexicographic order, the first valid one wins. An invalid
//! file that sorts first is fatal under containerd (it stops at it) and skipped by CRI-O, so it
//! fails too.
//!
//! Two checks: `cni.config` (does veilnet's conflist win?) and `cni.installed` (does its presence
//! match the agent's state?). A conflist left while the agent is down is a WARN, not a FAIL: the
//! agent leaves it in place on purpose (a restarting agent must not turn the node NotReady), and
//! `agent.up` already fails; what it means is said in the evidence: the runtime keeps sending new
//! pods to veilnet-cni, whose ADD waits for an agent that is not there when policy is enforced.

use std::path::Path;

use super::{Check, Context};
use crate::agent::cni_config::{CONFLIST_NAME, NETWORK_NAME};

/// The extensions the runtimes read (libcni's `ConfFiles`).
pub const EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

/// One file of the directory, as the runtime would read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfFile {
    pub name: String,
    /// The network's name and whether it is veilnet's (`type: veilnet-cni`), or why it is invalid.
    pub parsed: Result<Network, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    /// The plugin types, in order.
    pub types: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniFacts {
    pub dir: String,
    /// Sorted by name; `Err` when the directory cannot be read.
    pub files: Result<Vec<ConfFile>, String>,
}

pub fn gather(ctx: &Context) -> CniFacts {
    let dir = ctx.cni_conf_dir.display().to_string();
    let files = match std::fs::read_dir(&ctx.cni_conf_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e.to_string()),
        Ok(entries) => {
            let mut files: Vec<ConfFile> = entries
                .flatten()
                .filter(|e| e.path().is_file())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let ext = Path::new(&name).extension()?.to_str()?.to_string();
                    EXTENSIONS.contains(&ext.as_str()).then(|| ConfFile {
                        parsed: std::fs::read_to_string(e.path())
                            .map_err(|e| e.to_string())
                            .and_then(|text| parse(&name, &text)),
                        name,
                    })
                })
                .collect();
            files.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(files)
        }
    };
    CniFacts { dir, files }
}

/// Parses one file as libcni does: a `.conflist` is a list (`name`, non-empty `plugins`, each
/// with a `type`), anything else a single network (`name`, `type`).
pub fn parse(file_name: &str, text: &str) -> Result<Network, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let name = v
        .get("name")
        .and_then(|n| n.as_str())
        .filter(|n| !n.is_empty())
        .ok_or("no \"name\"")?
        .to_string();
    let type_of = |p: &serde_json::Value| {
        p.get("type")
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .map(str::to_string)
    };
    let types = if file_name.ends_with(".conflist") {
        let plugins = v
            .get("plugins")
            .and_then(|p| p.as_array())
            .filter(|p| !p.is_empty())
            .ok_or("no \"plugins\"")?;
        plugins
            .iter()
            .map(|p| type_of(p).ok_or("a plugin without \"type\""))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        vec![type_of(&v).ok_or("no \"type\"")?]
    };
    Ok(Network { name, types })
}

fn is_veilnet(n: &Network) -> bool {
    n.name == NETWORK_NAME && n.types.first().map(String::as_str) == Some("veilnet-cni")
}

/// `agent_up`: the agent's status is fresh (`agent.up` OK).
pub fn check(facts: &CniFacts, agent_up: bool) -> Vec<Check> {
    let dir = &facts.dir;
    let files = match &facts.files {
        Ok(f) => f,
        Err(e) => {
            return vec![Check::fail(
                "cni.config",
                format!("cannot read {dir}: {e}"),
                format!("check {dir} (the runtime's CNI conf dir) and its permissions"),
            )]
        }
    };
    let ours = files.iter().find(|f| f.name == CONFLIST_NAME);
    vec![config(dir, files, ours), installed(dir, ours, agent_up)]
}

fn config(dir: &str, files: &[ConfFile], ours: Option<&ConfFile>) -> Check {
    const NAME: &str = "cni.config";
    let listing = if files.is_empty() {
        "no config files".to_string()
    } else {
        files
            .iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    // An invalid file before ours: containerd stops there, CRI-O skips it.
    for f in files.iter().take_while(|f| f.name.as_str() < CONFLIST_NAME) {
        if let Err(e) = &f.parsed {
            return Check::fail(
                NAME,
                format!(
                    "{dir}/{} sorts before {CONFLIST_NAME} and is invalid ({e}): containerd refuses the directory, CRI-O skips it",
                    f.name
                ),
                format!("fix or remove it: rm {dir}/{}", f.name),
            );
        }
    }
    let winner = files.iter().find(|f| f.parsed.is_ok());
    match (winner, ours) {
        (Some(w), _) if w.name != CONFLIST_NAME => {
            let net = w.parsed.as_ref().expect("winner is valid");
            Check::fail(
                NAME,
                format!(
                    "{dir}/{} (network {:?}, {}) sorts first and wins over {CONFLIST_NAME}{}; files: {listing}",
                    w.name,
                    net.name,
                    net.types.join(","),
                    if ours.is_none() { " (absent)" } else { "" }
                ),
                format!(
                    "remove the other CNI's config (rm {dir}/{}) or uninstall that CNI, then restart the agent",
                    w.name
                ),
            )
        }
        (Some(w), _) => {
            let net = w.parsed.as_ref().expect("winner is valid");
            if is_veilnet(net) {
                Check::ok(
                    NAME,
                    format!("{dir}/{CONFLIST_NAME} is the first valid config; files: {listing}"),
                )
            } else {
                Check::fail(
                    NAME,
                    format!(
                        "{dir}/{CONFLIST_NAME} wins but is not veilnet's (network {:?}, {})",
                        net.name,
                        net.types.join(",")
                    ),
                    format!("rm {dir}/{CONFLIST_NAME} and restart the agent: it writes its own"),
                )
            }
        }
        (None, Some(f)) => Check::fail(
            NAME,
            format!(
                "{dir}/{CONFLIST_NAME} is invalid ({}); files: {listing}",
                f.parsed.as_ref().err().map(String::as_str).unwrap_or("")
            ),
            format!("rm {dir}/{CONFLIST_NAME} and restart the agent: it writes its own"),
        ),
        // No config at all: `cni.installed` says whether that is expected.
        (None, None) => Check::ok(NAME, format!("{dir}: {listing}, none wins over veilnet")),
    }
}

fn installed(dir: &str, ours: Option<&ConfFile>, agent_up: bool) -> Check {
    const NAME: &str = "cni.installed";
    match (ours.is_some(), agent_up) {
        (true, true) => Check::ok(NAME, format!("{dir}/{CONFLIST_NAME} present, agent up")),
        (false, false) => Check::ok(
            NAME,
            format!("{dir}/{CONFLIST_NAME} absent and the agent is down: the node stays NotReady until the agent installs it"),
        ),
        (false, true) => Check::fail(
            NAME,
            format!("the agent is up but {dir}/{CONFLIST_NAME} is missing: the runtime has no network for pods"),
            "restart the agent (it installs the conflist once its dataplane is in place), and check its log for CNI config write errors",
        ),
        (true, false) => Check::warn(
            NAME,
            format!("{dir}/{CONFLIST_NAME} present while the agent is down: the node looks Ready and new pods go to veilnet-cni, but no agent programs their routes or (with policy) admits them"),
            "start the agent; remove the conflist (rm it) only if veilnet is being uninstalled",
        ),
    }
}

/// Whether the agent counts as up for the checks that depend on it: `agent.up` is OK.
pub fn agent_up(agent: &super::agent::AgentFacts, now: jiff::Timestamp) -> bool {
    // Only `agent.up`: a WARN about a peer (an idle handshake) says nothing about the agent.
    super::agent::check(agent, now)
        .iter()
        .find(|c| c.name == "agent.up")
        .is_some_and(|c| c.verdict == super::Verdict::Ok)
}

#[cfg(test)]
mod tests {
    use super::super::Verdict;
    use super::*;

    fn ours() -> ConfFile {
        ConfFile {
            name: CONFLIST_NAME.into(),
            parsed: parse(
                CONFLIST_NAME,
                r#"{"cniVersion":"1.1.0","name":"veilnet","plugins":[{"type":"veilnet-cni"}]}"#,
            ),
        }
    }
    fn other(name: &str) -> ConfFile {
        ConfFile {
            name: name.into(),
            parsed: parse(
                name,
                r#"{"cniVersion":"1.0.0","name":"cbr0","plugins":[{"type":"flannel"},{"type":"portmap"}]}"#,
            ),
        }
    }
    fn facts(files: Vec<ConfFile>) -> CniFacts {
        CniFacts {
            dir: "/etc/cni/net.d".into(),
            files: Ok(files),
        }
    }
    fn verdicts(c: &[Check]) -> Vec<(&str, Verdict)> {
        c.iter().map(|c| (c.name.as_str(), c.verdict)).collect()
    }

    #[test]
    fn parse_follows_libcni() {
        assert!(parse("a.conflist", r#"{"name":"x","plugins":[]}"#).is_err());
        assert!(parse("a.conf", r#"{"name":"x"}"#).is_err());
        assert!(parse("a.conf", "{").unwrap_err().starts_with("not JSON"));
        assert_eq!(
            parse("a.json", r#"{"name":"x","type":"bridge"}"#).unwrap(),
            Network {
                name: "x".into(),
                types: vec!["bridge".into()]
            }
        );
    }

    #[test]
    fn ours_first_with_the_agent_up_is_ok() {
        let c = check(&facts(vec![ours(), other("99-loopback.conf")]), true);
        assert_eq!(
            verdicts(&c),
            [("cni.config", Verdict::Ok), ("cni.installed", Verdict::Ok)]
        );
        assert!(c[0]
            .evidence
            .contains("10-veilnet.conflist, 99-loopback.conf"));
    }

    #[test]
    fn another_config_sorting_first_fails_and_is_named() {
        let c = check(&facts(vec![other("05-other.conflist"), ours()]), true);
        assert_eq!(c[0].verdict, Verdict::Fail);
        assert!(
            c[0].evidence
                .starts_with("/etc/cni/net.d/05-other.conflist (network \"cbr0\", flannel,portmap) sorts first and wins"),
            "{}",
            c[0].evidence
        );
        assert!(c[0]
            .fix
            .as_ref()
            .unwrap()
            .contains("rm /etc/cni/net.d/05-other.conflist"));
        // A later file does not matter.
        let c = check(&facts(vec![ours(), other("50-other.conflist")]), true);
        assert_eq!(c[0].verdict, Verdict::Ok);
    }

    #[test]
    fn an_invalid_file_sorting_first_fails() {
        let broken = ConfFile {
            name: "00-broken.conf".into(),
            parsed: parse("00-broken.conf", "{ nope"),
        };
        let c = check(&facts(vec![broken, ours()]), true);
        assert_eq!(c[0].verdict, Verdict::Fail);
        assert!(
            c[0].evidence.contains("00-broken.conf sorts before"),
            "{}",
            c[0].evidence
        );
        assert!(c[0].evidence.contains("not JSON"), "{}", c[0].evidence);
    }

    #[test]
    fn our_file_invalid_or_foreign_fails() {
        let bad = ConfFile {
            name: CONFLIST_NAME.into(),
            parsed: Err("not JSON: EOF".into()),
        };
        let c = check(&facts(vec![bad]), true);
        assert_eq!(c[0].verdict, Verdict::Fail);
        assert!(c[0].evidence.contains("is invalid"), "{}", c[0].evidence);
        let foreign = ConfFile {
            name: CONFLIST_NAME.into(),
            ..other(CONFLIST_NAME)
        };
        let c = check(&facts(vec![foreign]), true);
        assert_eq!(c[0].verdict, Verdict::Fail);
        assert!(c[0].evidence.contains("not veilnet's"), "{}", c[0].evidence);
    }

    #[test]
    fn presence_must_match_the_agent() {
        // Missing while the agent is up.
        let c = check(&facts(vec![]), true);
        assert_eq!(
            verdicts(&c),
            [
                ("cni.config", Verdict::Ok),
                ("cni.installed", Verdict::Fail)
            ]
        );
        // Missing with another CNI's config: that one wins.
        let c = check(&facts(vec![other("20-flannel.conflist")]), true);
        assert_eq!(c[0].verdict, Verdict::Fail);
        assert!(c[0].evidence.contains("(absent)"), "{}", c[0].evidence);
        // Left in place while the agent is down.
        let c = check(&facts(vec![ours()]), false);
        assert_eq!(c[1].verdict, Verdict::Warn);
        assert!(c[1].evidence.contains("while the agent is down"));
        // Absent while the agent is down: consistent.
        let c = check(&facts(vec![]), false);
        assert_eq!(c[1].verdict, Verdict::Ok);
    }

    #[test]
    fn an_unreadable_directory_fails() {
        let c = check(
            &CniFacts {
                dir: "/etc/cni/net.d".into(),
                files: Err("Permission denied".into()),
            },
            true,
        );
        assert_eq!(verdicts(&c), [("cni.config", Verdict::Fail)]);
    }
}
