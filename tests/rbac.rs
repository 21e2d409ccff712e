//! RBAC: the manifest grants exactly the agent's API calls (`veilnet::install::AGENT_API_CALLS`),
//! and the source holds no API call missing from that list.
//!
//! The source scan is best effort, by design simple enough to read in one sitting. It looks at
//! every `.rs` file under `src/` (the product crate; the lab is its own crate, `tests/lab`), with
//! `#[cfg(test)]` items and comments removed, and finds:
//! - `Api<Kind>` bindings (`let x: Api<K>`, parameters `x: &Api<K>`, `let x = Api::<K>::…`) and
//!   kube `Api` methods called on them (`x.get_opt(`, `x.replace(`, `x.patch_status(` …);
//! - methods called directly on `Api::<K>::all(…)` / `Api::<K>::namespaced(…)`;
//! - an `Api` handed to `spawn_reflector(`, `spawn_reflector_where(` or `watcher(` (list + watch).
//!
//! Kinds resolve to API groups through `k8s_openapi::api::<group>::<version>::…` paths in the same
//! file. It does not follow an `Api` across files or through struct fields, dynamic types
//! (`Api<DynamicObject>`) or raw `client.request(…)`; it checks group, resource, subresource and
//! verb, not the namespace. A kind it cannot resolve fails the test, so it never silently looks
//! away from an `Api` it has seen.

mod manifest_docs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use veilnet::install::AGENT_API_CALLS;
use veilnet_lab::rbac::{self, grants_for};

#[test]
fn the_manifest_grants_exactly_the_agents_api_calls() {
    let (ns, sa) = manifest_docs::agent_identity();
    let grants = grants_for(&manifest_docs::rbac_objects(), &ns, &sa).unwrap();
    assert!(!grants.is_empty(), "nothing is bound to {ns}/{sa}");
    let report = rbac::check(&grants, AGENT_API_CALLS, &ns);
    for call in AGENT_API_CALLS {
        eprintln!(
            "{} {call}  — {}",
            if rbac::allows(&grants, call, &ns) {
                "ok "
            } else {
                "NO "
            },
            call.why
        );
    }
    assert!(report.missing.is_empty(), "missing: {:#?}", report.missing);
    assert!(
        report.excess.is_empty(),
        "granted beyond the agent's calls: {:#?}",
        report.excess
    );
}

#[test]
fn nothing_else_is_bound_to_the_agent_and_no_other_subject_is_bound() {
    // Every binding in the manifest binds exactly veilnet's ServiceAccount, so the manifest gives
    // no other identity any permission.
    let (ns, sa) = manifest_docs::agent_identity();
    let objects = manifest_docs::rbac_objects();
    let subjects = objects
        .cluster_role_bindings
        .iter()
        .flat_map(|b| b.subjects.clone().unwrap_or_default())
        .chain(
            objects
                .role_bindings
                .iter()
                .flat_map(|b| b.subjects.clone().unwrap_or_default()),
        );
    for s in subjects {
        assert_eq!(
            (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()),
            ("ServiceAccount", sa.as_str(), Some(ns.as_str()))
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The source scan.

/// One API use found in the source.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Found {
    group: String,
    resource: String,
    subresource: Option<String>,
    verb: String,
    /// The kind as written, for messages.
    kind: String,
}

/// kube `Api` methods → (RBAC verb, subresource).
const METHODS: &[(&str, &str, Option<&str>)] = &[
    ("get", "get", None),
    ("get_opt", "get", None),
    ("get_metadata", "get", None),
    ("get_metadata_opt", "get", None),
    ("get_status", "get", Some("status")),
    ("list", "list", None),
    ("list_metadata", "list", None),
    ("watch", "watch", None),
    ("watch_metadata", "watch", None),
    ("create", "create", None),
    ("replace", "update", None),
    ("replace_status", "update", Some("status")),
    ("patch", "patch", None),
    ("patch_metadata", "patch", None),
    ("patch_status", "patch", Some("status")),
    ("delete", "delete", None),
    ("delete_collection", "deletecollection", None),
    ("evict", "create", Some("eviction")),
    ("entry", "get", None),
];

/// Methods whose subresource is a run-time argument: the scan cannot check them.
const UNCHECKABLE: &[&str] = &[
    "get_subresource",
    "patch_subresource",
    "create_subresource",
    "replace_subresource",
];

fn api_group(module: &str) -> Option<&'static str> {
    Some(match module {
        "core" => "",
        "apps" => "apps",
        "networking" => "networking.k8s.io",
        "coordination" => "coordination.k8s.io",
        "events" => "events.k8s.io",
        "rbac" => "rbac.authorization.k8s.io",
        "discovery" => "discovery.k8s.io",
        "batch" => "batch",
        "policy" => "policy",
        _ => return None,
    })
}

fn plural(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    if lower == "endpoints" {
        lower
    } else if let Some(stem) = lower.strip_suffix('y') {
        format!("{stem}ies")
    } else if lower.ends_with('s') {
        format!("{lower}es")
    } else {
        format!("{lower}s")
    }
}

/// Removes `#[cfg(test)]` items: a one-line item (`mod fakes;`, `use …;`) alone, so the code after
/// it is still scanned; a block item (`mod tests { … }`) to the end of the file (test modules come
/// last in this code base).
fn without_test_code(source: &str) -> String {
    const ATTR: &str = "#[cfg(test)]";
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(i) = rest.find(ATTR) {
        out.push_str(&rest[..i]);
        let item = &rest[i + ATTR.len()..];
        match (item.find(';'), item.find('{')) {
            (Some(semi), brace) if brace.is_none_or(|b| semi < b) => rest = &item[semi + 1..],
            _ => return out,
        }
    }
    out.push_str(rest);
    out
}

/// Drops `#[cfg(test)]` code, comments, and whitespace next to punctuation, so that
/// `nodes\n    .list(` reads `nodes.list(`.
fn normalise(source: &str) -> String {
    let source = &without_test_code(source);
    // Comments go, and string and char literals are emptied, so neither can look like a call.
    let mut no_comments = String::with_capacity(source.len());
    let chars: Vec<char> = source.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == 'r'
            && matches!(next, Some('#') | Some('"'))
            && !chars[..i]
                .last()
                .is_some_and(|p| p.is_ascii_alphanumeric() || *p == '_')
        {
            // Raw string r#"…"#: skip to the quote followed by as many hashes.
            let hashes = chars[i + 1..].iter().take_while(|c| **c == '#').count();
            if chars.get(i + 1 + hashes) != Some(&'"') {
                no_comments.push(c);
                i += 1;
                continue;
            }
            let mut j = i + 2 + hashes;
            while j < chars.len()
                && !(chars[j] == '"'
                    && chars[j + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|c| **c == '#')
                        .count()
                        == hashes)
            {
                j += 1;
            }
            no_comments.push_str("\"\"");
            i = j + 1 + hashes;
        } else if c == '"' {
            let mut j = i + 1;
            while j < chars.len() && chars[j] != '"' {
                j += if chars[j] == '\\' { 2 } else { 1 };
            }
            no_comments.push_str("\"\"");
            i = j + 1;
        } else if c == '\'' && next == Some('\\') {
            // '\n', '\'' …: the escaped character is never the closing quote.
            let mut j = i + 3;
            while j < chars.len() && chars[j] != '\'' {
                j += 1;
            }
            no_comments.push_str("' '");
            i = j + 1;
        } else if c == '\'' && chars.get(i + 2) == Some(&'\'') {
            no_comments.push_str("' '");
            i += 3;
        } else {
            no_comments.push(c);
            i += 1;
        }
    }
    const PUNCT: &str = ".(<>:&,=;{}[]!?";
    let mut out = String::with_capacity(no_comments.len());
    let chars: Vec<char> = no_comments.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_whitespace() {
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let prev = out.chars().last();
            let next = chars.get(j).copied();
            let glue =
                prev.is_some_and(|p| PUNCT.contains(p)) || next.is_some_and(|n| PUNCT.contains(n));
            if !glue && prev.is_some() {
                out.push(' ');
            }
            i = j;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

fn ident_at(s: &str, start: usize) -> &str {
    let end = s[start..]
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .map_or(s.len(), |e| start + e);
    &s[start..end]
}

fn ident_before(s: &str, end: usize) -> &str {
    let start = s[..end]
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .map_or(0, |i| i + 1);
    &s[start..end]
}

/// `Kind` → API group, from `k8s_openapi::api::<group>::<version>::{…}` paths.
fn kind_groups(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    const PREFIX: &str = "k8s_openapi::api::";
    let mut rest = s;
    while let Some(i) = rest.find(PREFIX) {
        rest = &rest[i + PREFIX.len()..];
        let module = ident_at(rest, 0);
        let Some(group) = api_group(module) else {
            continue;
        };
        // Skip `<group>::<version>::`.
        let mut parts = rest.splitn(3, "::");
        let (_, _, tail) = (parts.next(), parts.next(), parts.next().unwrap_or(""));
        let names: Vec<&str> = if let Some(list) = tail.strip_prefix('{') {
            list[..list.find('}').unwrap_or(0)].split(',').collect()
        } else {
            vec![ident_at(tail, 0)]
        };
        for n in names {
            let n = n.split(" as ").next().unwrap_or("").trim();
            if n.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
                out.insert(n.to_string(), group.to_string());
            }
        }
    }
    out
}

/// Index just past the `)` matching the `(` at `open`.
fn close_paren(s: &str, open: usize) -> Option<usize> {
    let mut depth = 0;
    for (i, c) in s[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// What one file's source does with the API: (kind, method) pairs, reflectors as `list`+`watch`.
/// Errors name what the scan cannot check.
fn scan(source: &str) -> Result<Vec<Found>, String> {
    let s = normalise(source);
    let groups = kind_groups(&s);
    // (position, variable, kind): later bindings shadow earlier ones.
    let mut bindings: Vec<(usize, String, String)> = Vec::new();
    // (position just after the Api expression, kind) for `Api::<K>::ctor(…)` expressions.
    let mut direct: Vec<(usize, usize, String)> = Vec::new();
    for (i, _) in s.match_indices("Api<") {
        if i > 0 && (s.as_bytes()[i - 1].is_ascii_alphanumeric() || s.as_bytes()[i - 1] == b'_') {
            continue; // e.g. `MyApi<`
        }
        let kind = ident_at(&s, i + 4).to_string();
        let before = s[..i].trim_end_matches('&');
        if let Some(b) = before.strip_suffix(':') {
            let var = ident_before(b, b.len());
            if !var.is_empty() {
                bindings.push((i, var.to_string(), kind));
            }
        }
    }
    for (i, _) in s.match_indices("Api::<") {
        let kind = ident_at(&s, i + 6).to_string();
        let Some(open) = s[i..].find('(').map(|o| i + o) else {
            continue;
        };
        let Some(end) = close_paren(&s, open) else {
            continue;
        };
        // `let x = Api::<K>::…(…)` binds x.
        let before = &s[..i];
        if let Some(b) = before.strip_suffix('=') {
            let var = ident_before(b, b.len());
            if b[..b.len() - var.len()].ends_with("let ")
                || b[..b.len() - var.len()].ends_with("mut ")
            {
                bindings.push((i, var.to_string(), kind.clone()));
                continue;
            }
        }
        direct.push((i, end, kind));
    }
    bindings.sort();
    let kind_of_var_at = |var: &str, pos: usize| -> Option<String> {
        bindings
            .iter()
            .rfind(|(p, v, _)| *p < pos && v == var)
            .map(|(_, _, k)| k.clone())
    };
    let mut uses: Vec<(String, &str)> = Vec::new(); // (kind, method)
                                                    // Methods on bound variables.
    for (pos, var, _) in &bindings {
        for (j, _) in s[*pos..].match_indices(&format!("{var}.")) {
            let at = pos + j;
            let prev = s[..at].chars().last();
            if prev.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
                continue; // a longer identifier, or a field of something else
            }
            let method = ident_at(&s, at + var.len() + 1);
            if s[at + var.len() + 1 + method.len()..].starts_with('(') {
                if let Some(kind) = kind_of_var_at(var, at) {
                    uses.push((kind, method));
                }
            }
        }
    }
    // Methods on `Api::<K>::ctor(…)` directly.
    for (_, end, kind) in &direct {
        if let Some(rest) = s[*end..].strip_prefix('.') {
            let method = ident_at(rest, 0);
            uses.push((kind.clone(), method));
        }
    }
    // Reflectors and watchers: list + watch.
    for call in ["spawn_reflector(", "spawn_reflector_where(", "watcher("] {
        for (j, _) in s.match_indices(call) {
            let arg = j + call.len();
            let kind = if s[arg..].starts_with("Api::<") {
                Some(ident_at(&s, arg + 6).to_string())
            } else {
                kind_of_var_at(ident_at(&s, arg), arg)
            };
            if let Some(kind) = kind {
                uses.push((kind.clone(), "list"));
                uses.push((kind, "watch"));
            }
        }
    }
    let mut found = Vec::new();
    for (kind, method) in uses {
        if kind.len() == 1 {
            continue; // a generic parameter (`Api<K>`): its callers are scanned instead
        }
        if UNCHECKABLE.contains(&method) {
            return Err(format!(
                "Api<{kind}>::{method}: subresource chosen at run time"
            ));
        }
        let Some((_, verb, sub)) = METHODS.iter().find(|(m, _, _)| *m == method) else {
            continue; // not a request (e.g. `into_client`)
        };
        let group = groups
            .get(&kind)
            .ok_or_else(|| format!("cannot resolve the API group of Api<{kind}>"))?;
        found.push(Found {
            group: group.clone(),
            resource: plural(&kind),
            subresource: sub.map(str::to_string),
            verb: verb.to_string(),
            kind,
        });
    }
    found.sort();
    found.dedup();
    Ok(found)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn scan_tree() -> BTreeMap<PathBuf, Vec<Found>> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut out = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        match scan(&text) {
            Ok(found) if found.is_empty() => {}
            Ok(found) => {
                out.insert(f.strip_prefix(&src).unwrap().to_path_buf(), found);
            }
            Err(e) => panic!("{}: {e}", f.display()),
        }
    }
    out
}

#[test]
fn every_api_call_in_the_source_is_in_the_list() {
    let tree = scan_tree();
    let mut unlisted = Vec::new();
    for (file, found) in &tree {
        for f in found {
            eprintln!(
                "{}: {} {}/{}{}",
                file.display(),
                f.verb,
                f.group,
                f.resource,
                f.subresource
                    .as_deref()
                    .map(|s| format!("/{s}"))
                    .unwrap_or_default()
            );
            let listed = AGENT_API_CALLS.iter().any(|c| {
                c.group == f.group
                    && c.resource == f.resource
                    && c.subresource == f.subresource.as_deref()
                    && c.verb == f.verb
            });
            if !listed {
                unlisted.push(format!("{}: {f:?}", file.display()));
            }
        }
    }
    assert!(
        unlisted.is_empty(),
        "API calls missing from src/install/api_calls.rs (add them, then the manifest's RBAC): {unlisted:#?}"
    );
    // The scan sees the calls it is meant to see, so an empty result cannot pass by accident.
    let all: Vec<&Found> = tree.values().flatten().collect();
    for (resource, sub, verb) in [
        ("nodes", Some("status"), "patch"),
        ("nodes", None, "get"),
        ("nodes", None, "watch"),
        ("configmaps", None, "create"),
        ("configmaps", None, "update"),
        ("events", None, "create"),
    ] {
        assert!(
            all.iter().any(|f| f.resource == resource
                && f.subresource.as_deref() == sub
                && f.verb == verb),
            "the scan did not find {verb} {resource} {sub:?}"
        );
    }
}

#[test]
fn scan_finds_bound_direct_and_reflected_calls() {
    let src = r#"
        use k8s_openapi::api::core::v1::{ConfigMap, Node};
        use k8s_openapi::api::networking::v1::NetworkPolicy as Np;
        #[cfg(test)]
        mod fakes; // a one-line test item: the code after it is still scanned
        async fn f(api: &Api<ConfigMap>, client: Client) {
            api.get_opt("x").await; // api.delete("x") in a comment is ignored
            let nodes: Api<Node> = Api::all(client.clone());
            nodes
                .list(&lp)
                .await;
            Api::<Node>::all(client)
                .patch_status("n", &pp, &patch)
                .await;
            let s = "nodes.delete(";
            spawn_reflector(Api::<NetworkPolicy>::all(c), cfg, n);
        }
        #[cfg(test)]
        mod tests { fn t(nodes: Api<Node>) { nodes.delete("x"); } }
    "#
    .replace("NetworkPolicy>::all", "Np>::all");
    // `Np` is imported under an alias the scan does not follow: an unresolvable kind is an error.
    assert!(scan(&src).unwrap_err().contains("Api<Np>"));
    let src = src
        .replace("Np>::all", "NetworkPolicy>::all")
        .replace("NetworkPolicy as Np;", "NetworkPolicy;");
    let found: Vec<(String, String, Option<String>, String)> = scan(&src)
        .unwrap()
        .into_iter()
        .map(|f| (f.group, f.resource, f.subresource, f.verb))
        .collect();
    let want = |g: &str, r: &str, s: Option<&str>, v: &str| {
        (
            g.to_string(),
            r.to_string(),
            s.map(str::to_string),
            v.to_string(),
        )
    };
    assert_eq!(
        found,
        vec![
            want("", "configmaps", None, "get"),
            want("", "nodes", None, "list"),
            want("", "nodes", Some("status"), "patch"),
            want("networking.k8s.io", "networkpolicies", None, "list"),
            want("networking.k8s.io", "networkpolicies", None, "watch"),
        ]
    );
}

#[test]
fn scan_flags_a_new_call_and_runtime_subresources() {
    let src = r#"
        use k8s_openapi::api::core::v1::Pod;
        fn f(pods: Api<Pod>) { pods.delete("p", &dp); }
    "#;
    let found = scan(src).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].resource.as_str(), found[0].verb.as_str()),
        ("pods", "delete")
    );
    assert!(!AGENT_API_CALLS
        .iter()
        .any(|c| c.resource == "pods" && c.verb == "delete"));
    let src = "use k8s_openapi::api::core::v1::Pod; fn f(p: Api<Pod>) { p.get_subresource(\"log\", \"x\"); }";
    assert!(scan(src).is_err());
}

#[test]
fn plurals() {
    assert_eq!(plural("NetworkPolicy"), "networkpolicies");
    assert_eq!(plural("ConfigMap"), "configmaps");
    assert_eq!(plural("Ingress"), "ingresses");
    assert_eq!(plural("Endpoints"), "endpoints");
}
