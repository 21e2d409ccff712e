//! What the agent last applied to each of its nftables tables, recorded in the run directory so
//! that `veilnet doctor` can tell a table someone edited (drift) from the one the agent loaded.
//!
//! After every successful load the agent lists the table back from the kernel and writes the
//! listing, [`canonical`]ised, to `<run dir>/applied.<family>.<table>.nft` (atomically). The
//! kernel's listing is the one form both sides can produce: the agent's scripts are incremental
//! deltas, not the table. Canonical means without what changes by itself while the rules stay
//! the same: counter values (anonymous and named), the elements of dynamic sets (the kernel adds
//! and expires them as traffic flows), `expires` timers and rule handles.

use std::path::{Path, PathBuf};

use super::nft::{self, Flags};
use super::NetfilterError;

/// The record of `family table` in `run_dir`.
pub fn record_path(run_dir: &Path, family: &str, table: &str) -> PathBuf {
    run_dir.join(format!("applied.{family}.{table}.nft"))
}

/// `listing` (nft's text output of `list table`) without its stateful parts (pure).
pub fn canonical(listing: &str) -> String {
    let mut out = String::new();
    // Inside a `set`/`map` block: whether it is dynamic; and whether we are skipping its elements.
    let mut in_set = false;
    let mut set_dynamic = false;
    let mut skipping_elements = false;
    let mut in_named_counter = false;
    for raw in listing.lines() {
        let line = strip_handle(raw.trim_end());
        let trimmed = line.trim();
        if skipping_elements {
            if trimmed.ends_with('}') {
                skipping_elements = false;
            }
            continue;
        }
        if trimmed.is_empty() {
            continue;
        }
        if (trimmed.starts_with("set ") || trimmed.starts_with("map ")) && trimmed.ends_with('{') {
            in_set = true;
            set_dynamic = false;
        } else if trimmed.starts_with("counter ") && trimmed.ends_with('{') {
            in_named_counter = true;
        } else if trimmed == "}" {
            in_set = false;
            in_named_counter = false;
        } else if in_set && trimmed.starts_with("flags ") && trimmed.contains("dynamic") {
            set_dynamic = true;
        } else if in_set && set_dynamic && trimmed.starts_with("elements = {") {
            if !trimmed.ends_with('}') {
                skipping_elements = true;
            }
            continue;
        } else if in_named_counter && trimmed.starts_with("packets ") {
            continue;
        }
        out.push_str(&strip_state(&line));
        out.push('\n');
    }
    out
}

fn strip_handle(line: &str) -> String {
    match line.find(" # handle ") {
        Some(i) => line[..i].to_string(),
        None => line.to_string(),
    }
}

/// `counter packets N bytes M` → `counter`; `expires Xs` dropped.
fn strip_state(line: &str) -> String {
    let words: Vec<&str> = line.split(' ').collect();
    let mut out: Vec<&str> = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        if (w == "packets" || w == "bytes") && i + 1 < words.len() && is_number(words[i + 1]) {
            i += 2;
            continue;
        }
        if w == "expires" && i + 1 < words.len() {
            i += 2;
            continue;
        }
        out.push(w);
        i += 1;
    }
    out.join(" ")
}

fn is_number(w: &str) -> bool {
    !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit())
}

/// Lists `family table` in the calling thread's namespace: `None` when there is no such table.
pub fn list_here(family: &str, table: &str) -> Result<Option<String>, NetfilterError> {
    match nft::run_here(
        &format!("list table {family} {table}"),
        Flags::default(),
        "list table",
    ) {
        Ok(text) => Ok(Some(text)),
        Err(NetfilterError::NftRefused { message, .. })
            if message.contains("No such file or directory")
                || message.contains("does not exist") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// After a successful load: lists `family table` (calling thread's namespace) and records its
/// canonical form. A failure is logged and costs only the doctor's drift check.
pub fn record_here(run_dir: &Path, family: &str, table: &str) {
    let result = list_here(family, table).and_then(|listing| {
        let path = record_path(run_dir, family, table);
        match listing {
            Some(text) => crate::fsutil::write_atomic(&path, canonical(&text).as_bytes()),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
        .map_err(|source| NetfilterError::NftIo {
            action: format!("recording {}", path.display()),
            source,
        })
    });
    if let Err(e) = result {
        tracing::warn!(error = %e, family, table, "cannot record the applied table");
    }
}

/// Removes the record of a table the agent removed on purpose.
pub fn forget(run_dir: &Path, family: &str, table: &str) {
    let _ = std::fs::remove_file(record_path(run_dir, family, table));
}

/// The first line where `expected` and `actual` (both canonical) differ, as `-expected`/`+actual`.
pub fn first_difference(expected: &str, actual: &str) -> Option<String> {
    if expected == actual {
        return None;
    }
    let (mut e, mut a) = (expected.lines(), actual.lines());
    loop {
        match (e.next(), a.next()) {
            (Some(x), Some(y)) if x == y => continue,
            (Some(x), Some(y)) => return Some(format!("-{} / +{}", x.trim(), y.trim())),
            (Some(x), None) => return Some(format!("-{} (missing)", x.trim())),
            (None, Some(y)) => return Some(format!("+{} (added)", y.trim())),
            (None, None) => return Some("whitespace only".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "table inet veilnet_wire {\n\
        \tcounter raw_pod_traffic {\n\
        \t\tpackets 12 bytes 3456\n\
        \t}\n\
        \n\
        \tset agent_clients {\n\
        \t\ttype ipv4_addr\n\
        \t\tsize 65535\n\
        \t\tflags dynamic\n\
        \t\telements = { 10.0.0.1 ct count over 8 expires 2s,\n\
        \t\t\t     10.0.0.2 }\n\
        \t}\n\
        \n\
        \tset vxlan_peers {\n\
        \t\ttype ipv4_addr\n\
        \t\telements = { 172.30.0.12 }\n\
        \t}\n\
        \n\
        \tchain forward {\n\
        \t\ttype filter hook forward priority -150; policy accept;\n\
        \t\toifname \"eth0\" ip saddr 10.244.0.0/16 counter packets 3 bytes 180 drop # handle 7\n\
        \t}\n\
        }\n";

    #[test]
    fn canonical_drops_counters_dynamic_elements_and_handles_but_keeps_config() {
        let c = canonical(LISTING);
        assert!(!c.contains("packets"), "{c}");
        assert!(!c.contains("10.0.0.1"), "{c}");
        assert!(!c.contains("handle"), "{c}");
        assert!(c.contains("elements = { 172.30.0.12 }"), "{c}");
        assert!(
            c.contains("oifname \"eth0\" ip saddr 10.244.0.0/16 counter drop"),
            "{c}"
        );
        assert!(c.contains("counter raw_pod_traffic {"), "{c}");
        // Traffic changes nothing.
        let later = LISTING
            .replace("packets 12 bytes 3456", "packets 99 bytes 1")
            .replace("10.0.0.2", "10.0.0.9");
        assert_eq!(canonical(&later), c);
    }

    #[test]
    fn first_difference_names_the_line() {
        let a = canonical(LISTING);
        assert_eq!(first_difference(&a, &a), None);
        let b =
            canonical(&LISTING.replace("\t\toifname", "\t\tip saddr 1.2.3.4 drop\n\t\toifname"));
        let d = first_difference(&a, &b).unwrap();
        assert!(d.contains("+ip saddr 1.2.3.4 drop"), "{d}");
    }
}
