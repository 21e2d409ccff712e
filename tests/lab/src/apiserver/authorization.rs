//! `authorization.k8s.io/v1` self-reviews, which `kubectl auth can-i` sends: a
//! SelfSubjectAccessReview (`can-i VERB RESOURCE`) or a SelfSubjectRulesReview (`can-i --list`).
//!
//! The stand-in authenticates and authorizes nobody, so every request is allowed, and the answers
//! say exactly that (`allowed: true` with a reason; rules of `*`). Impersonation (`--as`) changes
//! nothing here, as it changes nothing the stand-in does; RBAC questions belong on the real
//! control plane (`veilnet lab up --control-plane kubernetes`).

//!
//! kubectl sends these reviews in Kubernetes' protobuf encoding (`application/vnd.kubernetes.protobuf`,
//! accepting JSON back); the stand-in reads the few fields a review has (`protobuf`) and answers in
//! JSON.

use serde_json::{json, Map, Value};

use super::errors::{ApiError, Cause};

/// Why the stand-in allows a request.
pub const REASON: &str = "the lab's API stand-in has no authorization: every request is allowed";

/// The request body's encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Json,
    /// `application/vnd.kubernetes.protobuf`: the `k8s\0` envelope around a `runtime.Unknown`.
    Protobuf,
}

impl Encoding {
    pub fn from_content_type(content_type: Option<&str>) -> Self {
        match content_type {
            Some(ct) if ct.trim().starts_with("application/vnd.kubernetes.protobuf") => {
                Encoding::Protobuf
            }
            _ => Encoding::Json,
        }
    }
}

fn decode(body: &[u8], encoding: Encoding, kind: &str) -> Result<Value, ApiError> {
    let bad = |why: String| ApiError::bad_request(format!("invalid {kind}: {why}"));
    let v: Value = match encoding {
        Encoding::Json => serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?,
        Encoding::Protobuf => protobuf::review(body, kind).map_err(bad)?,
    };
    if !v.is_object() {
        return Err(bad("not an object".into()));
    }
    Ok(v)
}

/// POST `/apis/authorization.k8s.io/v1/selfsubjectaccessreviews`.
pub fn self_subject_access_review(body: &[u8], encoding: Encoding) -> Result<Value, ApiError> {
    let mut review = decode(body, encoding, "SelfSubjectAccessReview")?;
    let spec = review.get("spec").cloned().unwrap_or(Value::Null);
    let has = |k: &str| spec.get(k).is_some_and(|v| v.is_object());
    // The real server's validation: exactly one of the two attribute sets.
    match (has("resourceAttributes"), has("nonResourceAttributes")) {
        (true, false) | (false, true) => {}
        (both, _) => {
            let why = if both {
                "cannot be specified in combination with resourceAttributes"
            } else {
                "exactly one of nonResourceAttributes or resourceAttributes must be specified"
            };
            let field = if both {
                "spec.nonResourceAttributes"
            } else {
                "spec.resourceAttributes"
            };
            return Err(ApiError::invalid(
                "authorization.k8s.io",
                "SelfSubjectAccessReview",
                "",
                vec![Cause::invalid(field, &Value::Null, why)],
            ));
        }
    }
    review["apiVersion"] = json!("authorization.k8s.io/v1");
    review["kind"] = json!("SelfSubjectAccessReview");
    review["metadata"] = json!({ "creationTimestamp": null });
    review["status"] = json!({ "allowed": true, "reason": REASON });
    Ok(review)
}

/// POST `/apis/authorization.k8s.io/v1/selfsubjectrulesreviews`.
pub fn self_subject_rules_review(body: &[u8], encoding: Encoding) -> Result<Value, ApiError> {
    let mut review = decode(body, encoding, "SelfSubjectRulesReview")?;
    review["apiVersion"] = json!("authorization.k8s.io/v1");
    review["kind"] = json!("SelfSubjectRulesReview");
    review["metadata"] = json!({ "creationTimestamp": null });
    review["status"] = json!({
        "resourceRules": [{ "verbs": ["*"], "apiGroups": ["*"], "resources": ["*"] }],
        "nonResourceRules": [{ "verbs": ["*"], "nonResourceURLs": ["*"] }],
        "incomplete": false,
    });
    Ok(review)
}

/// Reads a review in protobuf (field numbers from `k8s.io/api/authorization/v1/generated.proto`)
/// with the shared wire reader.
mod protobuf {
    use super::*;
    use crate::apiserver::protobuf::{bytes_of, fields, Field};

    pub use crate::apiserver::protobuf::MAGIC;

    /// The string fields `names[i]` = field number `i + 1` of a message, as a JSON object.
    fn strings(buf: &[u8], names: &[&str]) -> Result<Value, String> {
        let mut obj = Map::new();
        for (tag, f) in fields(buf)? {
            let (Field::Bytes(b), Some(name)) =
                (f, tag.checked_sub(1).and_then(|i| names.get(i as usize)))
            else {
                continue;
            };
            let text = std::str::from_utf8(b).map_err(|e| e.to_string())?;
            obj.insert(name.to_string(), json!(text));
        }
        Ok(Value::Object(obj))
    }

    /// A SelfSubjectAccessReview or SelfSubjectRulesReview in its envelope, as JSON.
    pub fn review(body: &[u8], kind: &str) -> Result<Value, String> {
        let unknown = body.strip_prefix(MAGIC).ok_or("no k8s protobuf envelope")?;
        let raw = bytes_of(unknown, 2)?.unwrap_or_default();
        let spec_buf = bytes_of(raw, 2)?.unwrap_or_default();
        let mut spec = Map::new();
        if kind == "SelfSubjectRulesReview" {
            if let Value::Object(o) = strings(spec_buf, &["namespace"])? {
                spec = o;
            }
        } else {
            if let Some(b) = bytes_of(spec_buf, 1)? {
                let names = [
                    "namespace",
                    "verb",
                    "group",
                    "version",
                    "resource",
                    "subresource",
                    "name",
                ];
                spec.insert("resourceAttributes".into(), strings(b, &names)?);
            }
            if let Some(b) = bytes_of(spec_buf, 2)? {
                spec.insert(
                    "nonResourceAttributes".into(),
                    strings(b, &["path", "verb"])?,
                );
            }
        }
        Ok(json!({ "spec": spec }))
    }

    #[cfg(test)]
    pub use crate::apiserver::protobuf::encode::field;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_protobuf_access_review_is_read_like_its_json() {
        use protobuf::field;
        let attrs = [field(1, b"default"), field(2, b"create"), field(5, b"pods")].concat();
        let spec = field(1, &attrs);
        let review = field(2, &spec);
        let type_meta = [
            field(1, b"authorization.k8s.io/v1"),
            field(2, b"SelfSubjectAccessReview"),
        ]
        .concat();
        let unknown = [field(1, &type_meta), field(2, &review)].concat();
        let body = [protobuf::MAGIC, &unknown].concat();
        let r = self_subject_access_review(&body, Encoding::Protobuf).unwrap();
        assert_eq!(
            r["spec"]["resourceAttributes"],
            json!({"namespace": "default", "verb": "create", "resource": "pods"})
        );
        assert_eq!(r["status"]["allowed"], true);
        let e = self_subject_access_review(b"k8s\0\x12\x05ab", Encoding::Protobuf).unwrap_err();
        assert_eq!(e.code, 400, "{e:?}");
    }

    #[test]
    fn an_access_review_is_allowed_and_says_why() {
        let body = json!({
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {"verb": "create", "resource": "pods", "namespace": "default"}},
        });
        let r = self_subject_access_review(body.to_string().as_bytes(), Encoding::Json).unwrap();
        assert_eq!(r["status"]["allowed"], true);
        assert_eq!(r["status"]["reason"], REASON);
        assert_eq!(r["spec"], body["spec"]);
    }

    #[test]
    fn an_access_review_needs_exactly_one_attribute_set() {
        let none = json!({"spec": {}});
        let e =
            self_subject_access_review(none.to_string().as_bytes(), Encoding::Json).unwrap_err();
        assert_eq!(e.code, 422);
        let both = json!({"spec": {"resourceAttributes": {}, "nonResourceAttributes": {}}});
        let e =
            self_subject_access_review(both.to_string().as_bytes(), Encoding::Json).unwrap_err();
        assert_eq!(e.code, 422);
        assert_eq!(
            self_subject_access_review(b"[]", Encoding::Json)
                .unwrap_err()
                .code,
            400
        );
    }

    #[test]
    fn a_rules_review_lists_everything() {
        let r = self_subject_rules_review(br#"{"spec":{"namespace":"default"}}"#, Encoding::Json)
            .unwrap();
        assert_eq!(r["status"]["resourceRules"][0]["verbs"], json!(["*"]));
        assert_eq!(r["status"]["incomplete"], false);
    }
}
