//! Label selectors (`metav1.LabelSelector`), validated once and matched many times.
//!
//! Semantics follow apimachinery's `LabelSelectorAsSelector`: all requirements must hold;
//! `NotIn` and `DoesNotExist` also match objects without the key; an empty selector matches
//! everything. A selector the API server would have rejected is an error here, and the caller
//! decides what that means (a policy that selects nothing, a peer that matches nothing).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A validated label selector.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// Validates `selector`; `None` is the empty selector (matches everything).
    pub fn compile(selector: Option<&LabelSelector>) -> Result<Selector, String> {
        let Some(selector) = selector else {
            return Ok(Selector::default());
        };
        let mut requirements = Vec::new();
        for (k, v) in selector.match_labels.iter().flatten() {
            requirements.push(Requirement::Equals(k.clone(), v.clone()));
        }
        for expr in selector.match_expressions.iter().flatten() {
            let values = expr.values.clone().unwrap_or_default();
            let key = expr.key.clone();
            if key.is_empty() {
                return Err("matchExpressions entry with an empty key".into());
            }
            let req = match expr.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!(
                        "operator {} on key {key:?} needs at least one value",
                        expr.operator
                    ))
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(format!(
                        "operator {} on key {key:?} takes no values",
                        expr.operator
                    ))
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => return Err(format!("unknown selector operator {other:?}")),
            };
            requirements.push(req);
        }
        Ok(Selector { requirements })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|req| match req {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|v| v.to_string()).collect())
            },
        }
    }

    fn sel(match_labels: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>) -> Selector {
        Selector::compile(Some(&LabelSelector {
            match_labels: Some(labels(match_labels)),
            match_expressions: Some(exprs),
        }))
        .unwrap()
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(Selector::compile(None).unwrap().matches(&labels(&[])));
        let empty = Selector::compile(Some(&LabelSelector::default())).unwrap();
        assert_eq!(empty, Selector::default());
        assert!(empty.matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_all_must_hold() {
        let s = sel(&[("pod", "a"), ("tier", "web")], vec![]);
        assert!(s.matches(&labels(&[("pod", "a"), ("tier", "web"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("pod", "a")])));
        assert!(!s.matches(&labels(&[("pod", "b"), ("tier", "web")])));
    }

    #[test]
    fn expression_operators() {
        let in_ = sel(&[], vec![expr("pod", "In", &["b", "c"])]);
        assert!(in_.matches(&labels(&[("pod", "b")])));
        assert!(!in_.matches(&labels(&[("pod", "a")])));
        assert!(!in_.matches(&labels(&[])));

        let not_in = sel(&[], vec![expr("ns", "NotIn", &["x"])]);
        assert!(not_in.matches(&labels(&[("ns", "y")])));
        assert!(!not_in.matches(&labels(&[("ns", "x")])));
        assert!(not_in.matches(&labels(&[])), "NotIn matches a missing key");

        let exists = sel(&[], vec![expr("pod", "Exists", &[])]);
        assert!(exists.matches(&labels(&[("pod", "")])));
        assert!(!exists.matches(&labels(&[])));

        let dne = sel(&[], vec![expr("pod", "DoesNotExist", &[])]);
        assert!(!dne.matches(&labels(&[("pod", "a")])));
        assert!(dne.matches(&labels(&[("other", "a")])));

        let both = sel(&[("tier", "web")], vec![expr("pod", "In", &["a"])]);
        assert!(both.matches(&labels(&[("tier", "web"), ("pod", "a")])));
        assert!(!both.matches(&labels(&[("tier", "db"), ("pod", "a")])));
    }

    #[test]
    fn invalid_selectors_are_errors() {
        let bad = |e| {
            Selector::compile(Some(&LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![e]),
            }))
        };
        assert!(bad(expr("k", "Matches", &["v"]))
            .unwrap_err()
            .contains("unknown selector operator"));
        assert!(bad(expr("k", "In", &[])).is_err());
        assert!(bad(expr("k", "NotIn", &[])).is_err());
        assert!(bad(expr("k", "Exists", &["v"])).is_err());
        assert!(bad(expr("", "Exists", &[])).is_err());
    }
}
