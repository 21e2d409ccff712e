//! Kubernetes' protobuf encoding (`application/vnd.kubernetes.protobuf`), read side only.
//!
//! kubectl's typed client sends protobuf bodies: `kubectl create namespace|configmap|
//! serviceaccount|service|role|rolebinding|clusterrole|clusterrolebinding …` and `kubectl auth
//! can-i` POST their object in the `k8s\0` envelope around a `runtime.Unknown`, accepting JSON
//! back. The stand-in reads such bodies with a schema per kind (the field numbers of
//! `k8s.io/api/*/generated.proto`, checked against v1.34) into the JSON the rest of the server
//! works on. Zero values are dropped, as the JSON form omits them (gogo-protobuf writes every
//! non-pointer field, also when empty); fields the schema does not name (timestamps, managed
//! fields, status) are skipped: the server sets those itself.

use base64::Engine;
use serde_json::{json, Map, Value};

/// The media type of the encoding.
pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";
/// Kubernetes' protobuf envelope prefix.
pub const MAGIC: &[u8] = b"k8s\0";

pub enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long".into())
}

/// The fields of one message, in wire order: (field number, value).
pub fn fields(buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let field = match key & 7 {
            0 => Field::Varint(varint(buf, &mut pos)?),
            1 | 5 => {
                pos += if key & 7 == 1 { 8 } else { 4 };
                Field::Fixed
            }
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).map_err(|e| e.to_string())?;
                let end = pos
                    .checked_add(len)
                    .filter(|e| *e <= buf.len())
                    .ok_or("truncated field")?;
                let bytes = &buf[pos..end];
                pos = end;
                Field::Bytes(bytes)
            }
            w => return Err(format!("unsupported wire type {w}")),
        };
        out.push((key >> 3, field));
    }
    if pos > buf.len() {
        return Err("truncated field".into());
    }
    Ok(out)
}

/// The last length-delimited field `tag` of a message (protobuf's last-one-wins).
pub fn bytes_of(buf: &[u8], tag: u64) -> Result<Option<&[u8]>, String> {
    Ok(fields(buf)?.into_iter().rev().find_map(|(t, f)| match f {
        Field::Bytes(b) if t == tag => Some(b),
        _ => None,
    }))
}

/// The envelope's `runtime.Unknown`: (apiVersion, kind, raw message).
pub fn unwrap(body: &[u8]) -> Result<(String, String, &[u8]), String> {
    let unknown = body.strip_prefix(MAGIC).ok_or("no k8s protobuf envelope")?;
    let type_meta = bytes_of(unknown, 1)?.unwrap_or_default();
    let text = |tag| -> Result<String, String> {
        let b = bytes_of(type_meta, tag)?.unwrap_or_default();
        Ok(std::str::from_utf8(b)
            .map_err(|e| e.to_string())?
            .to_string())
    };
    let raw = bytes_of(unknown, 2)?.unwrap_or_default();
    Ok((text(1)?, text(2)?, raw))
}

/// A field's type in a schema.
#[derive(Clone, Copy)]
pub enum Ty {
    Str,
    /// A non-pointer bool: `false` is omitted.
    Bool,
    /// A `*bool`: kept when `false`.
    OptBool,
    Int,
    Msg(&'static [F]),
    Msgs(&'static [F]),
    Strings,
    MapStr,
    /// `map<string, bytes>`: base64 in JSON.
    MapBytes,
    IntOrString,
}

/// One field of a schema: number, JSON name, type.
pub struct F(pub u64, pub &'static str, pub Ty);

use Ty::*;

static OWNER_REFERENCE: &[F] = &[
    F(5, "apiVersion", Str),
    F(1, "kind", Str),
    F(3, "name", Str),
    F(4, "uid", Str),
    F(6, "controller", OptBool),
    F(7, "blockOwnerDeletion", OptBool),
];
static OBJECT_META: &[F] = &[
    F(1, "name", Str),
    F(2, "generateName", Str),
    F(3, "namespace", Str),
    F(5, "uid", Str),
    F(6, "resourceVersion", Str),
    F(11, "labels", MapStr),
    F(12, "annotations", MapStr),
    F(13, "ownerReferences", Msgs(OWNER_REFERENCE)),
    F(14, "finalizers", Strings),
];
static NAMESPACE: &[F] = &[
    F(1, "metadata", Msg(OBJECT_META)),
    F(2, "spec", Msg(&[F(1, "finalizers", Strings)])),
];
static CONFIG_MAP: &[F] = &[
    F(1, "metadata", Msg(OBJECT_META)),
    F(2, "data", MapStr),
    F(3, "binaryData", MapBytes),
    F(4, "immutable", OptBool),
];
static OBJECT_REFERENCE: &[F] = &[
    F(1, "kind", Str),
    F(2, "namespace", Str),
    F(3, "name", Str),
    F(4, "uid", Str),
    F(5, "apiVersion", Str),
    F(6, "resourceVersion", Str),
    F(7, "fieldPath", Str),
];
static SERVICE_ACCOUNT: &[F] = &[
    F(1, "metadata", Msg(OBJECT_META)),
    F(2, "secrets", Msgs(OBJECT_REFERENCE)),
    F(3, "imagePullSecrets", Msgs(&[F(1, "name", Str)])),
    F(4, "automountServiceAccountToken", OptBool),
];
static SERVICE_PORT: &[F] = &[
    F(1, "name", Str),
    F(2, "protocol", Str),
    F(6, "appProtocol", Str),
    F(3, "port", Int),
    F(4, "targetPort", IntOrString),
    F(5, "nodePort", Int),
];
static SERVICE_SPEC: &[F] = &[
    F(1, "ports", Msgs(SERVICE_PORT)),
    F(2, "selector", MapStr),
    F(3, "clusterIP", Str),
    F(18, "clusterIPs", Strings),
    F(4, "type", Str),
    F(5, "externalIPs", Strings),
    F(7, "sessionAffinity", Str),
    F(8, "loadBalancerIP", Str),
    F(9, "loadBalancerSourceRanges", Strings),
    F(10, "externalName", Str),
    F(11, "externalTrafficPolicy", Str),
    F(12, "healthCheckNodePort", Int),
    F(13, "publishNotReadyAddresses", Bool),
    F(19, "ipFamilies", Strings),
    F(17, "ipFamilyPolicy", Str),
    F(20, "allocateLoadBalancerNodePorts", OptBool),
    F(21, "loadBalancerClass", Str),
    F(22, "internalTrafficPolicy", Str),
    F(23, "trafficDistribution", Str),
];
static SERVICE: &[F] = &[
    F(1, "metadata", Msg(OBJECT_META)),
    F(2, "spec", Msg(SERVICE_SPEC)),
];
static POLICY_RULE: &[F] = &[
    F(1, "verbs", Strings),
    F(2, "apiGroups", Strings),
    F(3, "resources", Strings),
    F(4, "resourceNames", Strings),
    F(5, "nonResourceURLs", Strings),
];
static ROLE: &[F] = &[
    F(1, "metadata", Msg(OBJECT_META)),
    F(2, "rules", Msgs(POLICY_RULE)),
];
static SUBJECT: &[F] = &[
    F(1, "kind", Str),
    F(2, "apiGroup", Str),
    F(3, "name", Str),
    F(4, "namespace", Str),
];
static ROLE_REF: &[F] = &[F(1, "apiGroup", Str), F(2, "kind", Str), F(3, "name", Str)];
static ROLE_BINDING: &[F] = &[
    F(1, "metadata", Msg(OBJECT_META)),
    F(2, "subjects", Msgs(SUBJECT)),
    F(3, "roleRef", Msg(ROLE_REF)),
];

/// The schema of a kind the stand-in reads in protobuf.
pub fn schema(api_version: &str, kind: &str) -> Option<&'static [F]> {
    Some(match (api_version, kind) {
        ("v1", "Namespace") => NAMESPACE,
        ("v1", "ConfigMap") => CONFIG_MAP,
        ("v1", "ServiceAccount") => SERVICE_ACCOUNT,
        ("v1", "Service") => SERVICE,
        ("rbac.authorization.k8s.io/v1", "Role" | "ClusterRole") => ROLE,
        ("rbac.authorization.k8s.io/v1", "RoleBinding" | "ClusterRoleBinding") => ROLE_BINDING,
        _ => return None,
    })
}

fn utf8(b: &[u8]) -> Result<String, String> {
    Ok(std::str::from_utf8(b)
        .map_err(|e| e.to_string())?
        .to_string())
}

/// A map entry message: key = 1, value = 2.
fn entry(b: &[u8]) -> Result<(String, &[u8]), String> {
    let key = bytes_of(b, 1)?.unwrap_or_default();
    Ok((utf8(key)?, bytes_of(b, 2)?.unwrap_or_default()))
}

fn int_or_string(b: &[u8]) -> Result<Value, String> {
    let mut ty = 0;
    let mut int = 0i64;
    let mut text = String::new();
    for (tag, f) in fields(b)? {
        match (tag, f) {
            (1, Field::Varint(v)) => ty = v,
            // int32 is sign-extended to 64 bits on the wire.
            (2, Field::Varint(v)) => int = v as i64,
            (3, Field::Bytes(s)) => text = utf8(s)?,
            _ => {}
        }
    }
    Ok(if ty == 1 { json!(text) } else { json!(int) })
}

/// Decodes one message with `schema` into JSON.
pub fn message(buf: &[u8], schema: &[F]) -> Result<Value, String> {
    let mut obj = Map::new();
    for (tag, f) in fields(buf)? {
        let Some(F(_, name, ty)) = schema.iter().find(|s| s.0 == tag) else {
            continue;
        };
        let name = name.to_string();
        match (*ty, f) {
            (Str, Field::Bytes(b)) => {
                obj.insert(name, json!(utf8(b)?));
            }
            (Bool | OptBool, Field::Varint(v)) => {
                obj.insert(name, json!(v != 0));
            }
            (Int, Field::Varint(v)) => {
                obj.insert(name, json!(v as i64));
            }
            (Msg(s), Field::Bytes(b)) => {
                obj.insert(name, message(b, s)?);
            }
            (Msgs(s), Field::Bytes(b)) => push(&mut obj, name, message(b, s)?),
            (Strings, Field::Bytes(b)) => push(&mut obj, name, json!(utf8(b)?)),
            (MapStr, Field::Bytes(b)) => {
                let (k, v) = entry(b)?;
                insert(&mut obj, name, k, json!(utf8(v)?));
            }
            (MapBytes, Field::Bytes(b)) => {
                let (k, v) = entry(b)?;
                let text = base64::engine::general_purpose::STANDARD.encode(v);
                insert(&mut obj, name, k, json!(text));
            }
            (IntOrString, Field::Bytes(b)) => {
                obj.insert(name, int_or_string(b)?);
            }
            _ => return Err(format!("field {name} has the wrong wire type")),
        }
    }
    // The JSON form omits zero values of non-pointer fields.
    obj.retain(|name, v| {
        let pointer = schema
            .iter()
            .any(|F(_, n, t)| n == name && matches!(t, OptBool));
        pointer
            || !matches!(v, Value::String(s) if s.is_empty())
                && *v != json!(false)
                && *v != json!(0)
                && !matches!(v, Value::Object(o) if o.is_empty())
    });
    Ok(Value::Object(obj))
}

fn push(obj: &mut Map<String, Value>, name: String, v: Value) {
    if let Value::Array(a) = obj.entry(name).or_insert_with(|| json!([])) {
        a.push(v);
    }
}

fn insert(obj: &mut Map<String, Value>, name: String, key: String, v: Value) {
    if let Value::Object(m) = obj.entry(name).or_insert_with(|| json!({})) {
        m.insert(key, v);
    }
}

/// A whole request body: the object in JSON, with its `apiVersion` and `kind`; an error names
/// the kinds the stand-in cannot read in protobuf.
pub fn object(body: &[u8]) -> Result<Value, String> {
    let (api_version, kind, raw) = unwrap(body)?;
    let schema = schema(&api_version, &kind).ok_or_else(|| {
        format!("the stand-in reads {api_version} {kind} only as JSON, not in protobuf")
    })?;
    let mut obj = message(raw, schema)?;
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    Ok(obj)
}

/// Test helpers: encode messages.
#[cfg(test)]
pub mod encode {
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// A length-delimited field.
    pub fn field(tag: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint((tag << 3) | 2, &mut out);
        varint(bytes.len() as u64, &mut out);
        out.extend_from_slice(bytes);
        out
    }

    /// A varint field.
    pub fn int(tag: u64, v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        varint(tag << 3, &mut out);
        varint(v, &mut out);
        out
    }

    /// A map entry field.
    pub fn entry(tag: u64, k: &str, v: &[u8]) -> Vec<u8> {
        field(tag, &[field(1, k.as_bytes()), field(2, v)].concat())
    }

    /// The `k8s\0` envelope around a message.
    pub fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let type_meta = [field(1, api_version.as_bytes()), field(2, kind.as_bytes())].concat();
        let unknown = [field(1, &type_meta), field(2, raw)].concat();
        [super::MAGIC, &unknown].concat()
    }
}

#[cfg(test)]
mod tests {
    use super::encode::{entry, envelope, field, int};
    use super::{json, object};

    /// What `kubectl create configmap cm --from-literal=k=v -n cmp` sends (gogo writes the empty
    /// non-pointer strings too).
    #[test]
    fn a_configmap_reads_like_its_json() {
        let meta = [
            field(1, b"cm"),
            field(2, b""),
            field(3, b"cmp"),
            field(8, &[]),
            entry(11, "app", b"x"),
        ]
        .concat();
        let raw = [
            field(1, &meta),
            entry(2, "k", b"v"),
            entry(3, "bin", &[0, 1]),
        ]
        .concat();
        let obj = object(&envelope("v1", "ConfigMap", &raw)).unwrap();
        assert_eq!(
            obj,
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "cm", "namespace": "cmp", "labels": {"app": "x"}},
                "data": {"k": "v"}, "binaryData": {"bin": "AAE="},
            })
        );
    }

    #[test]
    fn pointer_bools_and_int_or_string_keep_their_values() {
        let sa = [field(1, &field(1, b"sa")), int(4, 0)].concat();
        let obj = object(&envelope("v1", "ServiceAccount", &sa)).unwrap();
        assert_eq!(obj["automountServiceAccountToken"], false);
        let port = [
            field(2, b"TCP"),
            int(3, 80),
            field(4, &[int(1, 0), int(2, 8080)].concat()),
        ]
        .concat();
        let named = [
            int(3, 81),
            field(4, &[int(1, 1), field(3, b"http")].concat()),
        ]
        .concat();
        let spec = [field(1, &port), field(1, &named), field(4, b"ClusterIP")].concat();
        let svc = [field(1, &field(1, b"web")), field(2, &spec)].concat();
        let obj = object(&envelope("v1", "Service", &svc)).unwrap();
        assert_eq!(
            obj["spec"],
            json!({"type": "ClusterIP", "ports": [
                {"protocol": "TCP", "port": 80, "targetPort": 8080},
                {"port": 81, "targetPort": "http"},
            ]})
        );
    }

    #[test]
    fn unknown_kinds_and_broken_bodies_are_errors() {
        let e = object(&envelope("apps/v1", "Deployment", &[])).unwrap_err();
        assert!(e.contains("only as JSON"), "{e}");
        assert!(object(b"{}").is_err());
        assert!(object(b"k8s\0\x12\x05ab").is_err());
    }
}
