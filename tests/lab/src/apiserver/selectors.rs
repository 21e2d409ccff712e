//! Label and field selectors in the query-string syntax of `labelSelector` / `fieldSelector`.
//!
//! Labels: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`, `k>n`, `k<n`, comma
//! meaning AND. Fields: `path=v`, `path==v`, `path!=v`, comma meaning AND, over a per-kind set of
//! supported paths.

use serde_json::Value;

use super::errors::ApiError;
use super::meta;
use super::resources::ResourceDef;

#[derive(Clone, Debug, PartialEq)]
enum LabelOp {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
    Gt(i64),
    Lt(i64),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelSelector {
    reqs: Vec<(String, LabelOp)>,
}

/// Splits on commas that are not inside a `( … )` set.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn parse_set(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(
        inner
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect(),
    )
}

fn check_key(key: &str, whole: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::bad_request(format!(
            "unable to parse requirement: found '', expected: identifier in {whole:?}"
        )));
    }
    if let Some(e) = meta::qualified_name_error(key) {
        return Err(ApiError::bad_request(format!(
            "unable to parse requirement: invalid label key \"{key}\": {e}"
        )));
    }
    Ok(())
}

fn check_value(value: &str) -> Result<(), ApiError> {
    match meta::label_value_error(value) {
        Some(e) => Err(ApiError::bad_request(format!(
            "unable to parse requirement: invalid label value: \"{value}\": {e}"
        ))),
        None => Ok(()),
    }
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(LabelSelector { reqs });
        }
        for part in split_top_level(s) {
            let part = part.trim();
            let (key, op) = if let Some(k) = part.strip_prefix('!') {
                (k.trim().to_string(), LabelOp::DoesNotExist)
            } else if let Some((k, v)) = part.split_once("!=") {
                (k.trim().to_string(), LabelOp::NotEq(v.trim().to_string()))
            } else if let Some((k, v)) = part.split_once("==") {
                (k.trim().to_string(), LabelOp::Eq(v.trim().to_string()))
            } else if let Some((k, v)) = part.split_once('=') {
                (k.trim().to_string(), LabelOp::Eq(v.trim().to_string()))
            } else if let Some((k, v)) = part.split_once('>') {
                let n = v.trim().parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "invalid label selector {s:?}: {v:?} is not an integer"
                    ))
                })?;
                (k.trim().to_string(), LabelOp::Gt(n))
            } else if let Some((k, v)) = part.split_once('<') {
                let n = v.trim().parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "invalid label selector {s:?}: {v:?} is not an integer"
                    ))
                })?;
                (k.trim().to_string(), LabelOp::Lt(n))
            } else if let Some((k, set)) = split_word(part, "notin") {
                let set = parse_set(set).ok_or_else(|| bad_set(s))?;
                (k.to_string(), LabelOp::NotIn(set))
            } else if let Some((k, set)) = split_word(part, "in") {
                let set = parse_set(set).ok_or_else(|| bad_set(s))?;
                (k.to_string(), LabelOp::In(set))
            } else {
                (part.to_string(), LabelOp::Exists)
            };
            check_key(&key, s)?;
            match &op {
                LabelOp::Eq(v) | LabelOp::NotEq(v) => check_value(v)?,
                LabelOp::In(vs) | LabelOp::NotIn(vs) => {
                    for v in vs {
                        check_value(v)?;
                    }
                }
                _ => {}
            }
            reqs.push((key, op));
        }
        Ok(LabelSelector { reqs })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = meta::labels(obj);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.reqs.iter().all(|(k, op)| match op {
            LabelOp::Eq(v) => get(k) == Some(v.as_str()),
            LabelOp::NotEq(v) => get(k) != Some(v.as_str()),
            LabelOp::In(set) => get(k).is_some_and(|x| set.iter().any(|s| s == x)),
            LabelOp::NotIn(set) => !get(k).is_some_and(|x| set.iter().any(|s| s == x)),
            LabelOp::Exists => get(k).is_some(),
            LabelOp::DoesNotExist => get(k).is_none(),
            LabelOp::Gt(n) => get(k)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x > *n),
            LabelOp::Lt(n) => get(k)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x < *n),
        })
    }
}

fn bad_set(s: &str) -> ApiError {
    ApiError::bad_request(format!(
        "unable to parse requirement: expected a parenthesised set of values in {s:?}"
    ))
}

/// `key <word> (set)` split on the operator word, which must stand alone.
fn split_word<'a>(part: &'a str, word: &str) -> Option<(&'a str, &'a str)> {
    let mut tokens = part.splitn(2, char::is_whitespace);
    let key = tokens.next()?.trim();
    let rest = tokens.next()?.trim_start();
    let set = rest.strip_prefix(word)?;
    if !set.trim_start().starts_with('(') {
        return None;
    }
    Some((key, set))
}

#[derive(Clone, Debug, PartialEq)]
enum FieldOp {
    Eq(String),
    NotEq(String),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSelector {
    reqs: Vec<(String, FieldOp)>,
}

impl FieldSelector {
    /// Parses and checks every path against what `def` supports (400 otherwise, as the real
    /// server's "field label not supported").
    pub fn parse(s: &str, def: &ResourceDef) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(FieldSelector { reqs });
        }
        for part in s.split(',') {
            let part = part.trim();
            let (path, op) = if let Some((k, v)) = part.split_once("!=") {
                (k, FieldOp::NotEq(v.to_string()))
            } else if let Some((k, v)) = part.split_once("==") {
                (k, FieldOp::Eq(v.to_string()))
            } else if let Some((k, v)) = part.split_once('=') {
                (k, FieldOp::Eq(v.to_string()))
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                )));
            };
            let path = path.trim();
            let supported = path == "metadata.name"
                || path == "metadata.namespace"
                || def.field_labels.contains(&path);
            if !supported {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {path}"
                )));
            }
            reqs.push((path.to_string(), op));
        }
        Ok(FieldSelector { reqs })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs.iter().all(|(path, op)| {
            let actual = field_value(obj, path);
            match op {
                FieldOp::Eq(v) => actual == *v,
                FieldOp::NotEq(v) => actual != *v,
            }
        })
    }
}

/// The string a field selector compares against: missing fields are "", booleans "true"/"false".
/// `source` on core events is `source.component`, as the real field label maps it.
fn field_value(obj: &Value, path: &str) -> String {
    let path = if path == "source" {
        "source.component"
    } else {
        path
    };
    let parts: Vec<&str> = path.split('.').collect();
    match meta::value_at(obj, &parts) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::{def, id_of, Kind};
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({ "metadata": { "name": "a", "namespace": "ns", "labels": labels },
                "spec": { "nodeName": "n1", "hostNetwork": true }, "status": { "phase": "Running" } })
    }

    #[test]
    fn equality_and_inequality() {
        let o = obj(json!({ "app": "web", "tier": "fe" }));
        assert!(LabelSelector::parse("app=web").unwrap().matches(&o));
        assert!(LabelSelector::parse("app==web,tier=fe")
            .unwrap()
            .matches(&o));
        assert!(!LabelSelector::parse("app=web,tier=be").unwrap().matches(&o));
        assert!(LabelSelector::parse("app!=db").unwrap().matches(&o));
        assert!(LabelSelector::parse("missing!=x").unwrap().matches(&o));
        assert!(!LabelSelector::parse("app!=web").unwrap().matches(&o));
    }

    #[test]
    fn set_based() {
        let o = obj(json!({ "app": "web" }));
        assert!(LabelSelector::parse("app in (db, web)")
            .unwrap()
            .matches(&o));
        assert!(!LabelSelector::parse("app notin (db,web)")
            .unwrap()
            .matches(&o));
        assert!(LabelSelector::parse("other notin (x)").unwrap().matches(&o));
        assert!(!LabelSelector::parse("other in (x)").unwrap().matches(&o));
        assert!(LabelSelector::parse("app,!other").unwrap().matches(&o));
        assert!(!LabelSelector::parse("!app").unwrap().matches(&o));
        assert!(LabelSelector::parse("app in (web),app")
            .unwrap()
            .matches(&o));
    }

    #[test]
    fn numeric_comparisons() {
        let o = obj(json!({ "rank": "5" }));
        assert!(LabelSelector::parse("rank>3").unwrap().matches(&o));
        assert!(!LabelSelector::parse("rank<3").unwrap().matches(&o));
    }

    #[test]
    fn malformed_label_selectors_are_bad_requests() {
        for s in ["app in web", "=x", "app=@@", "a/b/c=x", "rank>x"] {
            let e = LabelSelector::parse(s).unwrap_err();
            assert_eq!(e.code, 400, "{s}");
        }
        assert!(LabelSelector::parse("").unwrap().matches(&obj(json!({}))));
    }

    #[test]
    fn field_selectors_per_kind() {
        let pods = def(id_of(Kind::Pod));
        let o = obj(json!({}));
        let f = FieldSelector::parse("spec.nodeName=n1,status.phase!=Pending", pods).unwrap();
        assert!(f.matches(&o));
        let f = FieldSelector::parse("metadata.name==a,metadata.namespace=ns", pods).unwrap();
        assert!(f.matches(&o));
        assert!(FieldSelector::parse("spec.hostNetwork=true", pods)
            .unwrap()
            .matches(&o));
        assert!(!FieldSelector::parse("spec.nodeName=n2", pods)
            .unwrap()
            .matches(&o));
        let e = FieldSelector::parse("spec.nope=1", pods).unwrap_err();
        assert_eq!(e.message, "field label not supported: spec.nope");
        let cms = def(id_of(Kind::ConfigMap));
        assert!(FieldSelector::parse("spec.nodeName=n1", cms).is_err());
    }

    #[test]
    fn event_involved_object_fields() {
        let events = def(id_of(Kind::CoreEvent));
        let ev = json!({ "metadata": { "name": "e" }, "involvedObject": { "kind": "Pod", "name": "p" },
                         "source": { "component": "kubelet" } });
        let f = FieldSelector::parse(
            "involvedObject.kind=Pod,involvedObject.name=p,source=kubelet",
            events,
        )
        .unwrap();
        assert!(f.matches(&ev));
    }
}
