//! The rendered ruleset as named nft objects (pure): what [`super::render`] produces, what the
//! full-replace script is printed from, and what [`super::diff`] compares.
//!
//! Objects that exist per pod, per policy or per peer list are numbered by [`Names`], which keeps
//! the number of every identity (pod and direction, policy, peer list, …) the previous ruleset
//! already had. A label change therefore renames nothing: it touches only the set elements, map
//! elements and chains whose content really changed, which is what makes an incremental update
//! small.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write;
use std::hash::Hash;

use super::compile::{Direction, PortSet};
use super::model::ObjectRef;

/// Name of both veilnet tables (`inet veilnet` for policy, `bridge veilnet` for anti-spoofing).
pub const TABLE: &str = "veilnet";

/// Address family of a veilnet table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Inet,
    Bridge,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Inet => "inet",
            Family::Bridge => "bridge",
        }
    }
}

/// Kind of a named nft object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Counter,
    Set,
    /// A map; its elements are `key : value`.
    Map,
    Chain,
}

impl ObjectKind {
    pub fn keyword(self) -> &'static str {
        match self {
            ObjectKind::Counter => "counter",
            ObjectKind::Set => "set",
            ObjectKind::Map => "map",
            ObjectKind::Chain => "chain",
        }
    }

    /// Sets and maps hold elements; chains hold rules; counters hold nothing we write.
    pub fn has_elements(self) -> bool {
        matches!(self, ObjectKind::Set | ObjectKind::Map)
    }
}

/// One named object of a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftObject {
    pub kind: ObjectKind,
    pub name: String,
    /// The lines of its block before the content (type, flags, hook, comment): what cannot
    /// change without recreating the object.
    pub decl: Vec<String>,
    /// Set or map elements (their order does not matter), or chain rules (in order).
    pub content: Vec<String>,
}

impl NftObject {
    /// The key of a map element `key : value` (a set element is its own key).
    pub fn element_key(&self, element: &str) -> String {
        match self.kind {
            ObjectKind::Map => element
                .split_once(" : ")
                .map_or(element, |(k, _)| k)
                .to_string(),
            _ => element.to_string(),
        }
    }

    /// The object's block as it appears inside `table … { }`, content included.
    pub fn write_block(&self, out: &mut String) {
        self.write_head(out);
        if self.kind.has_elements() {
            write_elements(out, self.content.iter().map(String::as_str));
        } else {
            for line in &self.content {
                let _ = writeln!(out, "\t\t{line}");
            }
        }
        out.push_str("\t}\n");
    }

    /// `{kind} {name} {` and the declaration lines, without the closing brace.
    fn write_head(&self, out: &mut String) {
        let _ = writeln!(out, "\t{} {} {{", self.kind.keyword(), self.name);
        for line in &self.decl {
            let _ = writeln!(out, "\t\t{line}");
        }
    }

    /// `add {kind} {family} veilnet {name} { decl }`: the object without its content.
    pub fn write_add(&self, family: Family, out: &mut String) {
        let _ = write!(
            out,
            "add {} {} {TABLE} {} {{",
            self.kind.keyword(),
            family.as_str(),
            self.name
        );
        if self.decl.is_empty() {
            out.push_str(" }\n");
            return;
        }
        out.push('\n');
        for line in &self.decl {
            let _ = writeln!(out, "\t{line}");
        }
        out.push_str("}\n");
    }
}

/// `elements = { a, b }` inside a set or map block (nothing for an empty one).
pub(crate) fn write_elements<'a>(out: &mut String, elements: impl Iterator<Item = &'a str>) {
    let mut first = true;
    for e in elements {
        if first {
            out.push_str("\t\telements = { ");
            first = false;
        } else {
            out.push_str(",\n\t\t\t     ");
        }
        out.push_str(e);
    }
    if !first {
        out.push_str(" }\n");
    }
}

/// One of veilnet's two tables, objects in the order they are declared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftTable {
    pub family: Family,
    pub objects: Vec<NftObject>,
}

/// The whole rendered ruleset of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    /// First line of the full script (`# …`), for whoever reads it.
    pub comment: String,
    pub tables: Vec<NftTable>,
    /// Named counter → the policy it counts for.
    pub(crate) policy_counters: BTreeMap<String, ObjectRef>,
    /// Named counter → the pod whose DNS it counts, and what it counts.
    pub(crate) dns_counters: BTreeMap<String, (ObjectRef, super::render::DnsCount)>,
    pub(crate) names: Names,
}

impl Ruleset {
    /// The script that replaces both tables in one transaction: each table is declared
    /// (creating it if absent), deleted, and declared again with its full content.
    pub fn script(&self) -> String {
        let size: usize = self
            .tables
            .iter()
            .flat_map(|t| &t.objects)
            .map(|o| {
                32 + o
                    .decl
                    .iter()
                    .chain(&o.content)
                    .map(|l| l.len() + 8)
                    .sum::<usize>()
            })
            .sum();
        let mut out = String::with_capacity(size + 256);
        let _ = writeln!(out, "{}", self.comment);
        for t in &self.tables {
            let f = t.family.as_str();
            let _ = writeln!(out, "table {f} {TABLE} {{\n}}\ndelete table {f} {TABLE}");
            let _ = writeln!(out, "table {f} {TABLE} {{");
            for o in &t.objects {
                o.write_block(&mut out);
            }
            out.push_str("}\n");
        }
        out
    }

    /// Named counters of policies and the policy each counts for.
    pub fn policy_counters(&self) -> impl Iterator<Item = (&str, &ObjectRef)> {
        self.policy_counters.iter().map(|(n, p)| (n.as_str(), p))
    }

    /// The policy that named counter `name` counts for.
    pub fn counter_policy(&self, name: &str) -> Option<&ObjectRef> {
        self.policy_counters.get(name)
    }

    /// The pod whose DNS named counter `name` counts, and what it counts.
    pub fn counter_dns(&self, name: &str) -> Option<(&ObjectRef, super::render::DnsCount)> {
        self.dns_counters.get(name).map(|(p, t)| (p, *t))
    }

    /// Every DNS counter: name, pod, what it counts.
    pub fn dns_counters(
        &self,
    ) -> impl Iterator<Item = (&str, &ObjectRef, super::render::DnsCount)> {
        self.dns_counters
            .iter()
            .map(|(n, (p, t))| (n.as_str(), p, *t))
    }
}

/// Stable numbers of one kind of object, by identity.
#[derive(Clone, Debug)]
pub(crate) struct Numbering<K> {
    by_key: HashMap<K, u32>,
}

impl<K> Default for Numbering<K> {
    fn default() -> Self {
        Numbering {
            by_key: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone> Numbering<K> {
    /// Numbers `keys` (a repeated key gets its first number). A key `previous` numbered keeps
    /// its number. A new key gets the lowest number `previous` does not hold: the name of an
    /// object the same transaction removes is never given to another object, so a name always
    /// means one identity to the diff. Without `previous`, keys are numbered 0, 1, 2… in order.
    pub(crate) fn assign<'a>(
        previous: Option<&Numbering<K>>,
        keys: impl IntoIterator<Item = &'a K>,
    ) -> (Numbering<K>, Vec<u32>)
    where
        K: 'a,
    {
        let keys: Vec<&K> = keys.into_iter().collect();
        let mut by_key: HashMap<K, u32> = HashMap::with_capacity(keys.len());
        let mut taken: HashSet<u32> = HashSet::new();
        if let Some(prev) = previous {
            taken.extend(prev.by_key.values().copied());
            for k in &keys {
                if let Some(&n) = prev.by_key.get(*k) {
                    by_key.insert((*k).clone(), n);
                }
            }
        }
        let mut next = 0u32;
        let mut numbers = Vec::with_capacity(keys.len());
        for k in keys {
            let n = match by_key.get(k) {
                Some(&n) => n,
                None => {
                    while taken.contains(&next) {
                        next += 1;
                    }
                    taken.insert(next);
                    by_key.insert(k.clone(), next);
                    next
                }
            };
            numbers.push(n);
        }
        (Numbering { by_key }, numbers)
    }
}

/// The numbering of every per-identity object of a ruleset.
#[derive(Clone, Debug, Default)]
pub(crate) struct Names {
    /// Pod chains (`ing_<n>` / `egr_<n>`), by pod and direction.
    pub chains: Numbering<(ObjectRef, Direction)>,
    /// Policy counters (`pol_<n>`), by policy.
    pub policies: Numbering<ObjectRef>,
    /// Peer sets (`peer_<n>_v4/v6`), by peer list.
    pub peers: Numbering<String>,
    /// Port sets (`port_<n>`), by content (ports never change with labels).
    pub ports: Numbering<PortSet>,
    /// Egress named-port destination sets (`dest_<n>_v4/v6`), by peer list and port names.
    pub dests: Numbering<String>,
    /// Anti-spoofing chains (`port_<n>` in the bridge table), by host veth and pod.
    pub bridge_ports: Numbering<(String, ObjectRef)>,
    /// DNS query counters (`dnst_<n>` / `dnsu_<n>`), by pod.
    pub dns_pods: Numbering<ObjectRef>,
}

// Names are bookkeeping for the next render, not part of what the kernel holds.
impl PartialEq for Names {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Names {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_keeps_old_numbers_and_never_reuses_a_live_one() {
        let keys = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let first = keys(&["a", "b", "c"]);
        let (n1, nums) = Numbering::assign(None, &first);
        assert_eq!(nums, vec![0, 1, 2]);
        // b goes, d comes: d must not take b's number (b's object is deleted in the same
        // transaction that creates d's).
        let second = keys(&["d", "a", "c", "a"]);
        let (n2, nums) = Numbering::assign(Some(&n1), &second);
        assert_eq!(nums, vec![3, 0, 2, 0]);
        // Once b is gone from the previous numbering, its number is free again.
        let third = keys(&["e", "d"]);
        let (_, nums) = Numbering::assign(Some(&n2), &third);
        assert_eq!(nums, vec![1, 3]);
    }
}
