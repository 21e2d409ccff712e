//! The node's WireGuard private key: present, a regular file, root's, 0600 or stricter, and the
//! key the agent publishes.

use std::os::unix::fs::MetadataExt;

use super::{Check, Context};
use crate::agent::status::NodeStatus;
use crate::wg::keys;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFacts {
    pub path: String,
    /// `lstat`: whether it is a regular file, its owner and mode; or why it could not be read.
    pub meta: Result<(bool, u32, u32), String>,
    /// The public key of the private key in the file, or why none could be derived.
    pub public: Result<String, String>,
}

pub fn gather(ctx: &Context) -> KeyFacts {
    let path = crate::agent::wireguard::key_path(&ctx.state_dir);
    let meta = std::fs::symlink_metadata(&path)
        .map(|m| (m.file_type().is_file(), m.uid(), m.mode() & 0o7777))
        .map_err(|e| e.to_string());
    // Read the key directly (keys::load refuses loose permissions, which check() reports itself).
    let public = std::fs::read_to_string(&path)
        .map_err(|e| e.to_string())
        .and_then(|text| {
            let body = text.strip_suffix('\n').unwrap_or(&text);
            keys::decode_private(body).map_err(|e| e.to_string())
        })
        .map(|k| keys::encode_public(&keys::public_key(&k)));
    KeyFacts {
        path: path.display().to_string(),
        meta,
        public,
    }
}

pub fn check(facts: &KeyFacts, status: Option<&NodeStatus>) -> Vec<Check> {
    const FILE: &str = "keys.file";
    const MATCH: &str = "keys.published";
    let path = &facts.path;
    let (is_file, uid, mode) = match &facts.meta {
        Ok(m) => *m,
        Err(e) => {
            return vec![Check::fail(
                FILE,
                format!("no WireGuard key at {path} ({e})"),
                "start the agent: it creates the key on its first start (check --state-dir)",
            )]
        }
    };
    if !is_file {
        return vec![Check::fail(
            FILE,
            format!("{path} is not a regular file"),
            format!("remove {path} (a symlink or directory); the agent creates a new key (the node's identity changes)"),
        )];
    }
    let mut checks = Vec::new();
    if mode & 0o077 != 0 {
        checks.push(Check::fail(
            FILE,
            format!("{path} has mode {mode:04o}: readable or writable by others than its owner"),
            format!("chmod 600 {path} (and consider the key leaked: rotate it)"),
        ));
    } else if uid != 0 {
        checks.push(Check::fail(
            FILE,
            format!("{path} is owned by uid {uid}, not root"),
            format!("chown root:root {path}"),
        ));
    } else {
        match &facts.public {
            Ok(_) => checks.push(Check::ok(FILE, format!("{path}: root's, mode {mode:04o}"))),
            Err(e) => checks.push(Check::fail(
                FILE,
                format!("{path} does not hold a WireGuard key: {e}"),
                format!("restore it from a backup, or remove {path} so the agent makes a new one"),
            )),
        }
    }
    if let (Ok(public), Some(st)) = (&facts.public, status) {
        checks.push(if *public == st.public_key {
            Check::ok(
                MATCH,
                format!("the agent publishes this key ({})", st.key_fingerprint),
            )
        } else {
            Check::warn(
                MATCH,
                format!(
                    "the key file's public key {public} differs from the agent's status ({})",
                    st.public_key
                ),
                "a rotation in progress or a stale status: run again in a few seconds; if it stays, restart the agent",
            )
        });
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Verdict;

    fn facts(meta: Result<(bool, u32, u32), String>, public: &str) -> KeyFacts {
        KeyFacts {
            path: "/var/lib/veilnet/wireguard.key".into(),
            meta,
            public: Ok(public.into()),
        }
    }

    fn status(public: &str) -> NodeStatus {
        serde_json::from_value(serde_json::json!({
            "node": "node-1", "mode": "on", "podCidrs": [], "underlayIp": "", "underlayDev": "",
            "podMtu": 1370, "publicKey": public, "keyFingerprint": "f", "peers": [], "rejected": {},
            "matrix": {}, "updatedAt": "2026-01-01T00:00:00Z"
        }))
        .unwrap()
    }

    #[test]
    fn a_private_key_of_root_matching_the_status_is_ok() {
        let c = check(&facts(Ok((true, 0, 0o600)), "PUB"), Some(&status("PUB")));
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|c| c.verdict == Verdict::Ok), "{c:?}");
        let c = check(&facts(Ok((true, 0, 0o400)), "PUB"), None);
        assert_eq!(c[0].verdict, Verdict::Ok);
    }

    #[test]
    fn loose_permissions_foreign_owner_or_no_file_fail() {
        let c = check(&facts(Ok((true, 0, 0o644)), "PUB"), None);
        assert_eq!(c[0].verdict, Verdict::Fail);
        assert_eq!(
            c[0].fix.as_deref().unwrap().split(" (").next().unwrap(),
            "chmod 600 /var/lib/veilnet/wireguard.key"
        );
        assert!(c[0].evidence.contains("0644"), "{}", c[0].evidence);
        let c = check(&facts(Ok((true, 1000, 0o600)), "PUB"), None);
        assert_eq!(c[0].verdict, Verdict::Fail);
        assert!(c[0].evidence.contains("uid 1000"));
        let c = check(&facts(Ok((false, 0, 0o600)), "PUB"), None);
        assert_eq!(c[0].verdict, Verdict::Fail);
        let c = check(&facts(Err("No such file".into()), "PUB"), None);
        assert_eq!(c[0].verdict, Verdict::Fail);
        let mut bad = facts(Ok((true, 0, 0o600)), "PUB");
        bad.public = Err("bad length".into());
        assert_eq!(check(&bad, None)[0].verdict, Verdict::Fail);
    }

    #[test]
    fn a_different_published_key_warns() {
        let c = check(&facts(Ok((true, 0, 0o600)), "NEW"), Some(&status("OLD")));
        assert_eq!(c[1].name, "keys.published");
        assert_eq!(c[1].verdict, Verdict::Warn);
    }
}
