//! `metadata` helpers on JSON objects: names, timestamps, resource versions, and the name grammar
//! checks (DNS-1123 label / subdomain) the real server applies.

use rand::Rng;
use serde_json::{Map, Value};

/// Current time as RFC 3339 with second precision, as `metav1.Time` serialises.
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// `now + seconds`, RFC 3339.
pub fn rfc3339_in(seconds: i64) -> String {
    let ts = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(seconds))
        .unwrap_or_else(|_| jiff::Timestamp::now());
    ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

pub fn str_at<'a>(obj: &'a Value, path: &[&str]) -> Option<&'a str> {
    value_at(obj, path).and_then(Value::as_str)
}

pub fn value_at<'a>(obj: &'a Value, path: &[&str]) -> Option<&'a Value> {
    let mut cur = obj;
    for p in path {
        cur = cur.get(p)?;
    }
    Some(cur)
}

pub fn name(obj: &Value) -> &str {
    str_at(obj, &["metadata", "name"]).unwrap_or("")
}

pub fn namespace(obj: &Value) -> &str {
    str_at(obj, &["metadata", "namespace"]).unwrap_or("")
}

pub fn resource_version(obj: &Value) -> &str {
    str_at(obj, &["metadata", "resourceVersion"]).unwrap_or("")
}

pub fn uid(obj: &Value) -> &str {
    str_at(obj, &["metadata", "uid"]).unwrap_or("")
}

pub fn is_deleting(obj: &Value) -> bool {
    value_at(obj, &["metadata", "deletionTimestamp"]).is_some_and(|v| !v.is_null())
}

pub fn finalizers(obj: &Value) -> Vec<String> {
    value_at(obj, &["metadata", "finalizers"])
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub fn labels(obj: &Value) -> Option<&Map<String, Value>> {
    value_at(obj, &["metadata", "labels"]).and_then(Value::as_object)
}

/// The `metadata` map, created if absent (or if it was not an object).
pub fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    object_field_mut(obj, "metadata")
}

/// `obj[key]` as a map, created if absent. `obj` itself is made an object if it is not one.
pub fn object_field_mut<'a>(obj: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    if !obj.is_object() {
        *obj = Value::Object(Map::new());
    }
    let Value::Object(map) = obj else {
        unreachable!("just made an object")
    };
    let entry = map
        .entry(key.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if !entry.is_object() {
        *entry = Value::Object(Map::new());
    }
    match entry {
        Value::Object(m) => m,
        _ => unreachable!("just made an object"),
    }
}

pub fn set_meta(obj: &mut Value, key: &str, value: Value) {
    metadata_mut(obj).insert(key.to_string(), value);
}

pub fn remove_meta(obj: &mut Value, key: &str) {
    metadata_mut(obj).remove(key);
}

/// Random suffix for `generateName`, from the same consonant-and-digit alphabet the real server
/// uses (no vowels, so no accidental words).
pub fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// `generateName` + suffix, trimming the prefix so the result stays within 63 characters.
pub fn generated_name(prefix: &str) -> String {
    let max_prefix = 63 - 5;
    let prefix = if prefix.len() > max_prefix {
        &prefix[..max_prefix]
    } else {
        prefix
    };
    format!("{prefix}{}", random_suffix())
}

fn is_label_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
}

/// DNS-1123 label: at most 63 lowercase alphanumerics or '-', starting and ending alphanumeric.
pub fn dns1123_label_error(s: &str) -> Option<String> {
    if s.len() > 63 {
        return Some("must be no more than 63 characters".into());
    }
    let ok =
        !s.is_empty() && s.chars().all(is_label_char) && !s.starts_with('-') && !s.ends_with('-');
    if ok {
        None
    } else {
        Some("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')".into())
    }
}

/// DNS-1123 subdomain: at most 253 characters, dot-separated labels.
pub fn dns1123_subdomain_error(s: &str) -> Option<String> {
    if s.len() > 253 {
        return Some("must be no more than 253 characters".into());
    }
    let ok = !s.is_empty()
        && s.split('.').all(|part| {
            !part.is_empty()
                && part.chars().all(is_label_char)
                && !part.starts_with('-')
                && !part.ends_with('-')
        });
    if ok {
        None
    } else {
        Some("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')".into())
    }
}

/// Qualified name as used by label keys: optional `prefix/` (a subdomain) plus a name of at most
/// 63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric.
pub fn qualified_name_error(s: &str) -> Option<String> {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(p) = prefix {
        if let Some(e) = dns1123_subdomain_error(p) {
            return Some(format!("prefix part {e}"));
        }
    }
    if label_value_error(name).is_some() || name.is_empty() {
        return Some("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')".into());
    }
    None
}

/// Label value: empty, or at most 63 alphanumerics, '-', '_' or '.', starting and ending
/// alphanumeric.
pub fn label_value_error(s: &str) -> Option<String> {
    if s.is_empty() {
        return None;
    }
    let ok = s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        None
    } else {
        Some("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        assert!(dns1123_label_error("web-1").is_none());
        assert!(dns1123_label_error("Web").is_some());
        assert!(dns1123_label_error("-a").is_some());
        assert!(dns1123_label_error("a.b").is_some());
        assert!(dns1123_subdomain_error("a.b-c").is_none());
        assert!(dns1123_subdomain_error("a..b").is_some());
        assert!(dns1123_subdomain_error("").is_some());
        assert!(dns1123_label_error(&"a".repeat(64)).is_some());
    }

    #[test]
    fn label_keys_and_values() {
        assert!(qualified_name_error("app").is_none());
        assert!(qualified_name_error("kubernetes.io/metadata.name").is_none());
        assert!(qualified_name_error("a/b/c").is_some());
        assert!(label_value_error("").is_none());
        assert!(label_value_error("v1.2_x").is_none());
        assert!(label_value_error("-x").is_some());
    }

    #[test]
    fn generated_names_are_valid_labels() {
        let n = generated_name("web-");
        assert_eq!(n.len(), 9);
        assert!(n.starts_with("web-"));
        assert!(dns1123_label_error(&n).is_none());
        assert_eq!(generated_name(&"x".repeat(80)).len(), 63);
    }

    #[test]
    fn timestamps_are_second_precision_utc() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z'));
        assert!(t.parse::<jiff::Timestamp>().is_ok());
    }
}
