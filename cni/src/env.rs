//! The CNI protocol parameters passed in environment variables (`CNI_COMMAND`, `CNI_CONTAINERID`, …),
//! parsed and validated per command. Every failure here is error code 4 and names the variable.

use std::path::PathBuf;

/// What a runtime identifies an attachment by: `(CNI_CONTAINERID, CNI_IFNAME)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

/// An attachment together with the container's network namespace (ADD and CHECK).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub attachment: Attachment,
    pub netns: PathBuf,
    /// `K8S_POD_NAMESPACE`, `K8S_POD_NAME` and `K8S_POD_UID` from `CNI_ARGS`, when present.
    pub k8s_pod: Option<K8sPod>,
}

/// The Kubernetes pod a runtime says an attachment belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sPod {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

/// Reads the pod identity out of `CNI_ARGS` (`K1=V1;K2=V2`). Lenient: malformed pairs are
/// skipped, since `CNI_ARGS` is free-form and only needed when policy is enforced.
pub fn k8s_pod_from_cni_args(args: &str) -> Option<K8sPod> {
    let mut namespace = None;
    let mut name = None;
    let mut uid = None;
    for (key, value) in args.split(';').filter_map(|pair| pair.split_once('=')) {
        let value = Some(value.to_string()).filter(|v| !v.is_empty());
        match key {
            "K8S_POD_NAMESPACE" => namespace = value,
            "K8S_POD_NAME" => name = value,
            "K8S_POD_UID" => uid = value,
            _ => {}
        }
    }
    Some(K8sPod {
        namespace: namespace?,
        name: name?,
        uid,
    })
}

/// One parsed invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    Add(Target),
    Check(Target),
    /// `CNI_NETNS` is optional for DEL: the namespace may already be gone.
    Del {
        attachment: Attachment,
        netns: Option<PathBuf>,
    },
    Status,
    Version,
    Gc,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("required environment variable {var} is not set")]
    Missing { var: &'static str },
    #[error("environment variable {var}={value:?} is invalid: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl EnvError {
    /// The variable at fault, for the error result's `msg`.
    pub fn var(&self) -> &'static str {
        match self {
            EnvError::Missing { var } | EnvError::Invalid { var, .. } => var,
        }
    }
}

pub const CNI_COMMAND: &str = "CNI_COMMAND";
pub const CNI_CONTAINERID: &str = "CNI_CONTAINERID";
pub const CNI_NETNS: &str = "CNI_NETNS";
pub const CNI_IFNAME: &str = "CNI_IFNAME";
pub const CNI_PATH: &str = "CNI_PATH";
pub const CNI_ARGS: &str = "CNI_ARGS";

/// Linux `IFNAMSIZ` minus the terminating NUL.
pub const MAX_IFNAME_LEN: usize = 15;

/// Parses the variables through `get` (an empty value counts as unset, like the reference skel).
pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Invocation, EnvError> {
    let var = |name: &'static str| get(name).filter(|v| !v.is_empty());
    let required = |name: &'static str| var(name).ok_or(EnvError::Missing { var: name });

    let command = required(CNI_COMMAND)?;
    match command.as_str() {
        "VERSION" => Ok(Invocation::Version),
        "STATUS" => Ok(Invocation::Status),
        "GC" => {
            // The spec lists CNI_PATH as required for GC (for delegation); we delegate nothing
            // but keep the contract so misconfigured runtimes are noticed.
            required(CNI_PATH)?;
            Ok(Invocation::Gc)
        }
        "ADD" | "CHECK" => {
            let attachment = attachment(&required(CNI_CONTAINERID)?, &required(CNI_IFNAME)?)?;
            let netns = PathBuf::from(required(CNI_NETNS)?);
            let k8s_pod = var(CNI_ARGS).and_then(|a| k8s_pod_from_cni_args(&a));
            let target = Target {
                attachment,
                netns,
                k8s_pod,
            };
            Ok(if command == "ADD" {
                Invocation::Add(target)
            } else {
                Invocation::Check(target)
            })
        }
        "DEL" => Ok(Invocation::Del {
            attachment: attachment(&required(CNI_CONTAINERID)?, &required(CNI_IFNAME)?)?,
            netns: var(CNI_NETNS).map(PathBuf::from),
        }),
        _ => Err(EnvError::Invalid {
            var: CNI_COMMAND,
            value: command,
            reason: "expected ADD, DEL, CHECK, STATUS, GC or VERSION",
        }),
    }
}

fn attachment(container_id: &str, ifname: &str) -> Result<Attachment, EnvError> {
    validate_container_id(container_id).map_err(|reason| EnvError::Invalid {
        var: CNI_CONTAINERID,
        value: container_id.to_string(),
        reason,
    })?;
    validate_ifname(ifname).map_err(|reason| EnvError::Invalid {
        var: CNI_IFNAME,
        value: ifname.to_string(),
        reason,
    })?;
    Ok(Attachment {
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
    })
}

/// The spec: an alphanumeric first character, then alphanumerics, `_`, `.` or `-`.
pub fn validate_container_id(id: &str) -> Result<(), &'static str> {
    let mut chars = id.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() => {}
        _ => return Err("must start with an alphanumeric character"),
    }
    if chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        Ok(())
    } else {
        Err("may only contain alphanumerics, '_', '.' and '-'")
    }
}

/// What the kernel accepts as an interface name (`dev_valid_name`).
pub fn validate_ifname(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_IFNAME_LEN {
        return Err("must be 1 to 15 bytes long");
    }
    if name == "." || name == ".." {
        return Err("must not be '.' or '..'");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        return Err("must not contain '/', ':', NUL or whitespace");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const FULL: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/run/netns/pod"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    fn without(var: &str) -> Vec<(&'static str, &'static str)> {
        FULL.iter().copied().filter(|(k, _)| *k != var).collect()
    }

    fn with(command: &'static str) -> Vec<(&'static str, &'static str)> {
        let mut v = without("CNI_COMMAND");
        v.push(("CNI_COMMAND", command));
        v
    }

    #[test]
    fn add_parses() {
        let inv = parse(env(FULL)).unwrap();
        assert_eq!(
            inv,
            Invocation::Add(Target {
                attachment: Attachment {
                    container_id: "abc123".into(),
                    ifname: "eth0".into()
                },
                netns: "/run/netns/pod".into(),
                k8s_pod: None,
            })
        );
    }

    #[test]
    fn pod_identity_from_cni_args() {
        let mut v = FULL.to_vec();
        v.push((
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=a;junk;K8S_POD_UID=u-1",
        ));
        let Invocation::Add(target) = parse(env(&v)).unwrap() else {
            panic!("not ADD")
        };
        assert_eq!(
            target.k8s_pod,
            Some(K8sPod {
                namespace: "x".into(),
                name: "a".into(),
                uid: Some("u-1".into())
            })
        );
        assert_eq!(k8s_pod_from_cni_args("K8S_POD_NAME=a"), None);
        assert_eq!(
            k8s_pod_from_cni_args("K8S_POD_NAMESPACE=;K8S_POD_NAME=a"),
            None
        );
        assert_eq!(
            k8s_pod_from_cni_args("K8S_POD_NAMESPACE=x;K8S_POD_NAME=a")
                .unwrap()
                .uid,
            None
        );
    }

    #[test]
    fn missing_command() {
        let err = parse(env(&without("CNI_COMMAND"))).unwrap_err();
        assert_eq!(err, EnvError::Missing { var: "CNI_COMMAND" });
    }

    #[test]
    fn missing_vars_per_command() {
        for var in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            let err = parse(env(&without(var))).unwrap_err();
            assert_eq!(err.var(), var);
        }
        // DEL tolerates a missing netns, not a missing container id.
        let mut del = with("DEL");
        del.retain(|(k, _)| *k != "CNI_NETNS");
        assert!(matches!(
            parse(env(&del)).unwrap(),
            Invocation::Del { netns: None, .. }
        ));
        del.retain(|(k, _)| *k != "CNI_CONTAINERID");
        assert_eq!(parse(env(&del)).unwrap_err().var(), "CNI_CONTAINERID");
        // GC needs CNI_PATH, VERSION and STATUS need nothing else.
        let mut gc = with("GC");
        gc.retain(|(k, _)| *k != "CNI_PATH");
        assert_eq!(parse(env(&gc)).unwrap_err().var(), "CNI_PATH");
        assert_eq!(
            parse(env(&[("CNI_COMMAND", "VERSION")])).unwrap(),
            Invocation::Version
        );
        assert_eq!(
            parse(env(&[("CNI_COMMAND", "STATUS")])).unwrap(),
            Invocation::Status
        );
    }

    #[test]
    fn empty_counts_as_missing() {
        let mut v = without("CNI_IFNAME");
        v.push(("CNI_IFNAME", ""));
        assert_eq!(
            parse(env(&v)).unwrap_err(),
            EnvError::Missing { var: "CNI_IFNAME" }
        );
    }

    #[test]
    fn unknown_command() {
        let err = parse(env(&with("FROB"))).unwrap_err();
        assert_eq!(err.var(), "CNI_COMMAND");
    }

    #[test]
    fn container_id_rules() {
        assert!(validate_container_id("a").is_ok());
        assert!(validate_container_id("0abc_def.g-h").is_ok());
        assert!(validate_container_id("-abc").is_err());
        assert!(validate_container_id("abc/def").is_err());
        assert!(validate_container_id("").is_err());
        let mut v = without("CNI_CONTAINERID");
        v.push(("CNI_CONTAINERID", "../x"));
        assert_eq!(parse(env(&v)).unwrap_err().var(), "CNI_CONTAINERID");
    }

    #[test]
    fn ifname_rules() {
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_ifname("a23456789012345").is_ok());
        assert!(validate_ifname("a234567890123456").is_err());
        assert!(validate_ifname("..").is_err());
        assert!(validate_ifname("et h0").is_err());
        assert!(validate_ifname("eth/0").is_err());
    }
}
