//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), strategic merge patch, and
//! server-side apply.

pub mod apply;
pub mod strategic;

use serde_json::Value;

use super::errors::ApiError;
use super::resources::Kind;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    /// From the request's Content-Type (parameters such as `charset` are ignored).
    pub fn from_content_type(content_type: &str) -> Result<Self, ApiError> {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/json-patch+json" => Ok(PatchType::Json),
            "application/merge-patch+json" => Ok(PatchType::Merge),
            "application/strategic-merge-patch+json" => Ok(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => Ok(PatchType::Apply),
            _ => Err(ApiError::unsupported_media_type(content_type)),
        }
    }
}

fn parse_json(body: &[u8], what: &str) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding {what}: {e}")))
}

/// Applies a merge, JSON or strategic patch to `current`. Apply patches go through
/// [`apply::server_side_apply`] instead, as they need the field manager bookkeeping.
pub fn apply_patch(
    kind: Kind,
    current: &Value,
    patch_type: PatchType,
    body: &[u8],
) -> Result<Value, ApiError> {
    match patch_type {
        PatchType::Merge => {
            let patch = parse_json(body, "merge patch")?;
            let mut doc = current.clone();
            json_patch::merge(&mut doc, &patch);
            Ok(doc)
        }
        PatchType::Json => {
            let patch: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding json patch: {e}")))?;
            let mut doc = current.clone();
            json_patch::patch(&mut doc, &patch.0).map_err(|e| ApiError {
                code: 422,
                reason: "Invalid",
                message: format!(
                    "the server rejected our request due to an error in our request: {e}"
                ),
                details: None,
            })?;
            Ok(doc)
        }
        PatchType::Strategic => {
            let patch = parse_json(body, "strategic merge patch")?;
            strategic::apply(kind, current, &patch)
                .map_err(|e| ApiError::bad_request(e.to_string()))
        }
        PatchType::Apply => Err(ApiError::internal(
            "apply patches are handled by server_side_apply",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_types() {
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json; charset=utf-8").unwrap(),
            PatchType::Merge
        );
        assert_eq!(
            PatchType::from_content_type("application/json-patch+json").unwrap(),
            PatchType::Json
        );
        assert_eq!(
            PatchType::from_content_type("application/strategic-merge-patch+json").unwrap(),
            PatchType::Strategic
        );
        assert_eq!(
            PatchType::from_content_type("application/apply-patch+yaml").unwrap(),
            PatchType::Apply
        );
        assert_eq!(
            PatchType::from_content_type("text/plain").unwrap_err().code,
            415
        );
    }

    #[test]
    fn merge_patch_replaces_lists_and_deletes_nulls() {
        let cur = json!({ "metadata": { "labels": { "a": "1" } }, "spec": { "l": [1, 2] } });
        let out = apply_patch(
            Kind::ConfigMap,
            &cur,
            PatchType::Merge,
            br#"{"metadata":{"labels":{"a":null,"b":"2"}},"spec":{"l":[3]}}"#,
        )
        .unwrap();
        assert_eq!(
            out,
            json!({ "metadata": { "labels": { "b": "2" } }, "spec": { "l": [3] } })
        );
    }

    #[test]
    fn json_patch_ops_and_failures() {
        let cur = json!({ "metadata": { "labels": { "a": "1" } } });
        let out = apply_patch(Kind::ConfigMap, &cur, PatchType::Json,
            br#"[{"op":"add","path":"/metadata/labels/b","value":"2"},{"op":"remove","path":"/metadata/labels/a"}]"#).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({ "b": "2" }));
        let e = apply_patch(
            Kind::ConfigMap,
            &cur,
            PatchType::Json,
            br#"[{"op":"test","path":"/metadata/labels/a","value":"9"}]"#,
        )
        .unwrap_err();
        assert_eq!(e.code, 422);
        let e =
            apply_patch(Kind::ConfigMap, &cur, PatchType::Json, br#"{"op":"add"}"#).unwrap_err();
        assert_eq!(e.code, 400);
    }
}
