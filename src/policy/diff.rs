//! The transaction from one rendered ruleset to the next (pure).
//!
//! Objects are matched by name (names are stable across renders, see [`super::ruleset`]):
//! - a set or map present in both gets `delete element` / `add element` for what differs (a map
//!   element whose verdict changed is deleted and added again);
//! - a chain present in both whose rules differ is flushed and refilled (a pod chain holds the
//!   rules of the few policies selecting that pod, so this stays small);
//! - new objects are added, old ones deleted (chains flushed first).
//!
//! The operations are ordered so that nothing is referenced before it exists or deleted while
//! still referenced: declarations, then rules, then elements (map elements may jump to new
//! chains and stop jumping to old ones), then deletions (chains, then sets and maps, then
//! counters). The whole delta is one `nft -f -` script, so it commits atomically like a full
//! replace. When two rulesets differ in a way elements and chains cannot express (a table or an
//! object whose declaration changed), [`diff`] asks for the full replace instead.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;

use super::ruleset::{Family, NftObject, ObjectKind, Ruleset, TABLE};

/// One step of an incremental update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Declare a new object (its content comes with later operations).
    Add { family: Family, object: NftObject },
    /// Remove every rule of a chain.
    Flush { family: Family, chain: String },
    /// Append rules to a chain.
    AddRules {
        family: Family,
        chain: String,
        rules: Vec<String>,
    },
    /// Add elements to a set or map.
    AddElements {
        family: Family,
        set: String,
        elements: Vec<String>,
    },
    /// Delete elements (by key) from a set or map.
    DeleteElements {
        family: Family,
        set: String,
        keys: Vec<String>,
    },
    /// Delete an object (a chain must have been flushed).
    Delete {
        family: Family,
        kind: ObjectKind,
        name: String,
    },
}

/// The operations that turn one ruleset into another, in a valid order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub ops: Vec<Op>,
}

impl Delta {
    /// Nothing to do: the kernel already holds the new ruleset.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Named counters this delta deletes (with their values).
    pub fn deleted_counters(&self) -> impl Iterator<Item = (Family, &str)> {
        self.ops.iter().filter_map(|op| match op {
            Op::Delete {
                family,
                kind: ObjectKind::Counter,
                name,
            } => Some((*family, name.as_str())),
            _ => None,
        })
    }

    /// The delta as one `nft -f -` script (one transaction).
    pub fn script(&self) -> String {
        let mut out = String::new();
        for op in &self.ops {
            match op {
                Op::Add { family, object } => object.write_add(*family, &mut out),
                Op::Flush { family, chain } => {
                    let _ = writeln!(out, "flush chain {} {TABLE} {chain}", family.as_str());
                }
                Op::AddRules {
                    family,
                    chain,
                    rules,
                } => {
                    for rule in rules {
                        let _ =
                            writeln!(out, "add rule {} {TABLE} {chain} {rule}", family.as_str());
                    }
                }
                Op::AddElements {
                    family,
                    set,
                    elements,
                } => write_elements(&mut out, "add", *family, set, elements),
                Op::DeleteElements { family, set, keys } => {
                    write_elements(&mut out, "delete", *family, set, keys)
                }
                Op::Delete { family, kind, name } => {
                    let _ = writeln!(
                        out,
                        "delete {} {} {TABLE} {name}",
                        kind.keyword(),
                        family.as_str()
                    );
                }
            }
        }
        out
    }
}

fn write_elements(out: &mut String, verb: &str, family: Family, set: &str, elements: &[String]) {
    let _ = writeln!(
        out,
        "{verb} element {} {TABLE} {set} {{ {} }}",
        family.as_str(),
        elements.join(", ")
    );
}

/// How to get from the ruleset in the kernel to the next one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Element and chain updates (empty: nothing changed).
    Incremental(Delta),
    /// Replace both tables; the reason is for the log.
    Full { reason: String },
}

/// The plan from `old` (what the kernel holds) to `new`.
pub fn diff(old: &Ruleset, new: &Ruleset) -> Plan {
    let families = |r: &Ruleset| r.tables.iter().map(|t| t.family).collect::<Vec<_>>();
    if families(old) != families(new) {
        return Plan::Full {
            reason: "the set of tables changed".into(),
        };
    }
    let mut declare = Vec::new();
    let mut rules = Vec::new();
    let mut elements = Vec::new();
    let mut delete_chains = Vec::new();
    let mut delete_sets = Vec::new();
    let mut delete_counters = Vec::new();
    for (old_t, new_t) in old.tables.iter().zip(&new.tables) {
        let family = new_t.family;
        let old_by_name: HashMap<&str, &NftObject> =
            old_t.objects.iter().map(|o| (o.name.as_str(), o)).collect();
        let mut seen: HashSet<&str> = HashSet::with_capacity(new_t.objects.len());
        for n in &new_t.objects {
            seen.insert(&n.name);
            match old_by_name.get(n.name.as_str()) {
                None => {
                    declare.push(Op::Add {
                        family,
                        object: NftObject {
                            content: Vec::new(),
                            ..n.clone()
                        },
                    });
                    match n.kind {
                        ObjectKind::Chain if !n.content.is_empty() => rules.push(Op::AddRules {
                            family,
                            chain: n.name.clone(),
                            rules: n.content.clone(),
                        }),
                        ObjectKind::Set | ObjectKind::Map if !n.content.is_empty() => elements
                            .push(Op::AddElements {
                                family,
                                set: n.name.clone(),
                                elements: n.content.clone(),
                            }),
                        _ => {}
                    }
                }
                Some(o) if o.kind != n.kind || o.decl != n.decl => {
                    return Plan::Full {
                        reason: format!(
                            "{} {} {} changed its declaration",
                            family.as_str(),
                            n.kind.keyword(),
                            n.name
                        ),
                    };
                }
                Some(o) if o.content == n.content => {}
                Some(o) => match n.kind {
                    ObjectKind::Chain => {
                        rules.push(Op::Flush {
                            family,
                            chain: n.name.clone(),
                        });
                        if !n.content.is_empty() {
                            rules.push(Op::AddRules {
                                family,
                                chain: n.name.clone(),
                                rules: n.content.clone(),
                            });
                        }
                    }
                    ObjectKind::Set | ObjectKind::Map => {
                        element_changes(family, o, n, &mut elements);
                    }
                    // Counters have no content we write.
                    ObjectKind::Counter => {}
                },
            }
        }
        for o in old_t
            .objects
            .iter()
            .filter(|o| !seen.contains(o.name.as_str()))
        {
            let delete = Op::Delete {
                family,
                kind: o.kind,
                name: o.name.clone(),
            };
            match o.kind {
                ObjectKind::Chain => {
                    delete_chains.push(Op::Flush {
                        family,
                        chain: o.name.clone(),
                    });
                    delete_chains.push(delete);
                }
                ObjectKind::Set | ObjectKind::Map => delete_sets.push(delete),
                ObjectKind::Counter => delete_counters.push(delete),
            }
        }
    }
    // Declarations first (their rules and elements may refer to one another), then rules, then
    // elements, then what goes: chains (emptied first), sets and maps, counters.
    let mut ops = declare;
    ops.extend(rules);
    ops.extend(elements);
    ops.extend(delete_chains);
    ops.extend(delete_sets);
    ops.extend(delete_counters);
    Plan::Incremental(Delta { ops })
}

/// `delete element` for what `old` has and `new` has not (by key, for maps also when the value
/// changed), then `add element` for what `new` has and `old` has not.
fn element_changes(family: Family, old: &NftObject, new: &NftObject, out: &mut Vec<Op>) {
    let old_set: HashSet<&str> = old.content.iter().map(String::as_str).collect();
    let new_set: HashSet<&str> = new.content.iter().map(String::as_str).collect();
    // Keep the render order in the script (deterministic, and readable).
    let gone: Vec<String> = old
        .content
        .iter()
        .filter(|e| !new_set.contains(e.as_str()))
        .map(|e| old.element_key(e))
        .collect();
    let added: Vec<String> = new
        .content
        .iter()
        .filter(|e| !old_set.contains(e.as_str()))
        .cloned()
        .collect();
    if !gone.is_empty() {
        out.push(Op::DeleteElements {
            family,
            set: new.name.clone(),
            keys: gone,
        });
    }
    if !added.is_empty() {
        out.push(Op::AddElements {
            family,
            set: new.name.clone(),
            elements: added,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    use serde_json::json;

    use super::*;
    use crate::policy::testutil::{e2e_state, ip_of, np};
    use crate::policy::{compile_with, render, ClusterState, CompileOptions, NamespaceInfo};

    fn options() -> CompileOptions {
        CompileOptions {
            drop_unknown_pod_ports: true,
            ..CompileOptions::default()
        }
    }

    fn rendered(state: &ClusterState, previous: Option<&Ruleset>) -> Ruleset {
        let model = compile_with(state, "n1", &[IpAddr::from([10, 244, 0, 1])], &options());
        render(&model, previous)
    }

    fn delta(old: &Ruleset, new: &Ruleset) -> Delta {
        match diff(old, new) {
            Plan::Incremental(d) => d,
            Plan::Full { reason } => panic!("unexpected full replace: {reason}"),
        }
    }

    fn set_label(state: &mut ClusterState, ns: &str, pod: &str, key: &str, value: Option<&str>) {
        let p = state
            .pods
            .iter_mut()
            .find(|p| p.namespace == ns && p.name == pod)
            .unwrap();
        match value {
            Some(v) => p.labels.insert(key.into(), v.into()),
            None => p.labels.remove(key),
        };
    }

    /// x/a (on n1) accepts port 80 from pods labelled role=web in x.
    fn web_state() -> ClusterState {
        let mut s = e2e_state(vec![np(
            "x",
            "from-web",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "web"}}}], "ports": [{"port": 80}]}]}),
        )]);
        set_label(&mut s, "x", "b", "role", Some("web"));
        s
    }

    #[test]
    fn no_change_is_an_empty_delta() {
        let s = web_state();
        let first = rendered(&s, None);
        let again = rendered(&s, Some(&first));
        assert_eq!(again.script(), first.script());
        let d = delta(&first, &again);
        assert!(d.is_empty(), "{}", d.script());
        assert_eq!(d.script(), "");
    }

    #[test]
    fn a_peer_label_change_is_only_set_elements() {
        let mut s = web_state();
        let first = rendered(&s, None);
        // x/c (10.244.0.12) becomes a web pod: the peer set grows from x/b alone to the range
        // x/b..x/c, and nothing else changes.
        set_label(&mut s, "x", "c", "role", Some("web"));
        let second = rendered(&s, Some(&first));
        let d = delta(&first, &second);
        assert_eq!(
            d.script(),
            "delete element inet veilnet peer_0_v4 { 10.244.0.11 }\n\
             add element inet veilnet peer_0_v4 { 10.244.0.11-10.244.0.12 }\n"
        );
        assert_eq!(d.deleted_counters().count(), 0);
        // And back.
        set_label(&mut s, "x", "c", "role", None);
        let third = rendered(&s, Some(&second));
        assert_eq!(
            delta(&second, &third).script(),
            "delete element inet veilnet peer_0_v4 { 10.244.0.11-10.244.0.12 }\n\
             add element inet veilnet peer_0_v4 { 10.244.0.11 }\n"
        );
    }

    #[test]
    fn a_selected_pod_label_change_is_its_chain_and_map_element() {
        let mut s = web_state();
        s.policies.push(np(
            "y",
            "db",
            json!({"podSelector": {"matchLabels": {"role": "db"}}, "ingress": [{"ports": [{"port": 5432}]}]}),
        ));
        let first = rendered(&s, None);
        // y/a (10.244.1.10, on n1) becomes a db pod: policy y/db now selects a local pod, so it
        // gets a counter, y/a gets a chain, the ingress map an element. Existing names stay.
        set_label(&mut s, "y", "a", "role", Some("db"));
        let second = rendered(&s, Some(&first));
        let d = delta(&first, &second);
        let script = d.script();
        let want = "add counter inet veilnet pol_1 {\n\tcomment \"y/db\"\n}\n\
            add set inet veilnet port_1 {\n\ttype inet_proto . inet_service\n\tflags interval\n}\n\
            add chain inet veilnet ing_1 {\n\tcomment \"ingress y/a\"\n}\n\
            add rule inet veilnet ing_1 meta l4proto . th dport @port_1 counter name \"pol_1\" accept comment \"veilnet:allow:ingress:y/db#0\"\n\
            add rule inet veilnet ing_1 limit rate 10/second burst 20 packets log group 100 prefix \"veilnet:deny:ingress:y/a\"\n\
            add rule inet veilnet ing_1 counter name \"deny_ingress\" drop comment \"default deny, isolated by y/db\"\n\
            add element inet veilnet port_1 { tcp . 5432 }\n\
            add element inet veilnet ingress_v4 { 10.244.1.10 : jump ing_1 }\n";
        assert_eq!(script, want);
        // Relabelled away again: everything it added goes, including the counter (whose value
        // the applier banks first).
        set_label(&mut s, "y", "a", "role", None);
        let third = rendered(&s, Some(&second));
        let d = delta(&second, &third);
        assert_eq!(
            d.script(),
            "delete element inet veilnet ingress_v4 { 10.244.1.10 }\n\
             flush chain inet veilnet ing_1\n\
             delete chain inet veilnet ing_1\n\
             delete set inet veilnet port_1\n\
             delete counter inet veilnet pol_1\n"
        );
        assert_eq!(
            d.deleted_counters().collect::<Vec<_>>(),
            vec![(Family::Inet, "pol_1")]
        );
    }

    #[test]
    fn structural_changes_ask_for_the_full_replace() {
        let s = web_state();
        let first = rendered(&s, None);
        let mut changed = rendered(&s, Some(&first));
        let set = changed.tables[0]
            .objects
            .iter_mut()
            .find(|o| o.name == "peer_0_v4")
            .unwrap();
        set.decl = vec!["type ipv4_addr".into()];
        assert!(
            matches!(diff(&first, &changed), Plan::Full { reason } if reason.contains("peer_0_v4"))
        );
        let mut one_table = rendered(&s, Some(&first));
        one_table.tables.pop();
        assert!(matches!(diff(&first, &one_table), Plan::Full { .. }));
        // A chain that became a set under the same name.
        let mut kind = rendered(&s, Some(&first));
        let chain = kind.tables[0]
            .objects
            .iter_mut()
            .find(|o| o.name == "ing_0")
            .unwrap();
        chain.kind = ObjectKind::Set;
        assert!(matches!(diff(&first, &kind), Plan::Full { .. }));
    }

    // --- a model of nft's semantics, to check that a delta turns the old ruleset into the new ---

    #[derive(Clone, Debug, PartialEq, Eq)]
    struct SimObject {
        kind: ObjectKind,
        decl: Vec<String>,
        /// key → element (sets and maps).
        elements: BTreeMap<String, String>,
        rules: Vec<String>,
    }

    type Sim = BTreeMap<(Family, String), SimObject>;

    fn load(r: &Ruleset) -> Sim {
        let mut sim = Sim::new();
        for t in &r.tables {
            for o in &t.objects {
                let (elements, rules) = if o.kind.has_elements() {
                    let e = o
                        .content
                        .iter()
                        .map(|e| (o.element_key(e), e.clone()))
                        .collect();
                    (e, Vec::new())
                } else {
                    (BTreeMap::new(), o.content.clone())
                };
                let old = sim.insert(
                    (t.family, o.name.clone()),
                    SimObject {
                        kind: o.kind,
                        decl: o.decl.clone(),
                        elements,
                        rules,
                    },
                );
                assert!(old.is_none(), "{} declared twice", o.name);
            }
        }
        for ((family, name), o) in &sim {
            for text in o.rules.iter().chain(o.elements.values()) {
                for r in references(text) {
                    assert!(
                        sim.contains_key(&(*family, r.clone())),
                        "{name} refers to a missing {r}"
                    );
                }
            }
        }
        sim
    }

    /// Names a rule or map element refers to: `@set`, `counter name "c"`, `jump/goto chain`.
    fn references(text: &str) -> Vec<String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let mut out = Vec::new();
        for (i, w) in words.iter().enumerate() {
            if let Some(set) = w.strip_prefix('@') {
                out.push(set.to_string());
            }
            let prev = if i > 0 { words[i - 1] } else { "" };
            if matches!(prev, "jump" | "goto") {
                out.push(w.to_string());
            }
            if prev == "name" && i > 1 && words[i - 2] == "counter" {
                out.push(w.trim_matches('"').to_string());
            }
        }
        out
    }

    fn referenced(sim: &Sim, family: Family, name: &str) -> bool {
        sim.iter().filter(|((f, _), _)| *f == family).any(|(_, o)| {
            o.rules
                .iter()
                .chain(o.elements.values())
                .any(|t| references(t).iter().any(|r| r == name))
        })
    }

    /// Applies one operation as nft would, refusing what nft refuses (or what we must never
    /// rely on: adding what exists, deleting what is still used).
    fn apply(sim: &mut Sim, op: &Op) -> Result<(), String> {
        let exists = |sim: &Sim, f: Family, n: &str| sim.contains_key(&(f, n.to_string()));
        let check_refs = |sim: &Sim, f: Family, text: &str| {
            references(text)
                .into_iter()
                .find(|r| !exists(sim, f, r))
                .map_or(Ok(()), |r| Err(format!("{text:?} refers to missing {r}")))
        };
        match op {
            Op::Add { family, object } => {
                if exists(sim, *family, &object.name) {
                    return Err(format!("add of existing {}", object.name));
                }
                sim.insert(
                    (*family, object.name.clone()),
                    SimObject {
                        kind: object.kind,
                        decl: object.decl.clone(),
                        elements: BTreeMap::new(),
                        rules: Vec::new(),
                    },
                );
            }
            Op::Flush { family, chain } => {
                let o = sim
                    .get_mut(&(*family, chain.clone()))
                    .ok_or(format!("flush of missing {chain}"))?;
                o.rules.clear();
            }
            Op::AddRules {
                family,
                chain,
                rules,
            } => {
                for r in rules {
                    check_refs(sim, *family, r)?;
                }
                let o = sim
                    .get_mut(&(*family, chain.clone()))
                    .ok_or(format!("rules for missing {chain}"))?;
                if o.kind != ObjectKind::Chain {
                    return Err(format!("rules for non-chain {chain}"));
                }
                o.rules.extend(rules.iter().cloned());
            }
            Op::AddElements {
                family,
                set,
                elements,
            } => {
                for e in elements {
                    check_refs(sim, *family, e)?;
                }
                let o = sim
                    .get_mut(&(*family, set.clone()))
                    .ok_or(format!("elements for missing {set}"))?;
                let proto = NftObject {
                    kind: o.kind,
                    name: set.clone(),
                    decl: Vec::new(),
                    content: Vec::new(),
                };
                for e in elements {
                    let key = proto.element_key(e);
                    if o.elements.insert(key.clone(), e.clone()).is_some() {
                        return Err(format!("{set}: element {key} exists"));
                    }
                }
            }
            Op::DeleteElements { family, set, keys } => {
                let o = sim
                    .get_mut(&(*family, set.clone()))
                    .ok_or(format!("delete elements of missing {set}"))?;
                for k in keys {
                    o.elements
                        .remove(k)
                        .ok_or(format!("{set}: no element {k} to delete"))?;
                }
            }
            Op::Delete { family, kind, name } => {
                let o = sim
                    .get(&(*family, name.clone()))
                    .ok_or(format!("delete of missing {name}"))?;
                if o.kind != *kind {
                    return Err(format!("{name} is not a {}", kind.keyword()));
                }
                if !o.rules.is_empty() {
                    return Err(format!("delete of non-empty chain {name}"));
                }
                if referenced(sim, *family, name) {
                    return Err(format!("delete of {name} while referenced"));
                }
                sim.remove(&(*family, name.clone()));
            }
        }
        Ok(())
    }

    /// A small deterministic generator (xorshift).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
            &v[self.below(v.len())]
        }
    }

    fn policy_pool() -> Vec<k8s_openapi::api::networking::v1::NetworkPolicy> {
        vec![
            np(
                "x",
                "from-web",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "web"}}}], "ports": [{"port": 80}]}]}),
            ),
            np("x", "deny-all", json!({"podSelector": {}, "ingress": []})),
            np(
                "y",
                "db",
                json!({"podSelector": {"matchLabels": {"role": "db"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}, "podSelector": {"matchLabels": {"role": "web"}}}],
                             "ports": [{"port": 5432}, {"port": "serve-81-tcp"}]}]}),
            ),
            np(
                "y",
                "egress-named",
                json!({"podSelector": {"matchLabels": {"role": "web"}},
                "egress": [{"to": [{"podSelector": {"matchLabels": {"role": "db"}}, "namespaceSelector": {}}], "ports": [{"port": "serve-80-tcp"}]},
                           {"to": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}}], "ports": [{"port": 53, "protocol": "UDP"}]}]}),
            ),
            np(
                "z",
                "web-any",
                json!({"podSelector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["web", "db"]}]},
                "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "role", "operator": "Exists"}]}, "namespaceSelector": {}}]}],
                "policyTypes": ["Ingress", "Egress"]}),
            ),
            np(
                "x",
                "v6-peers",
                json!({"podSelector": {"matchLabels": {"role": "db"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"v6": "yes"}}, "namespaceSelector": {}}], "ports": [{"port": 9000, "endPort": 9100, "protocol": "SCTP"}]}]}),
            ),
        ]
    }

    /// One random change of the kind a cluster sees.
    fn mutate(
        rng: &mut Rng,
        state: &mut ClusterState,
        pool: &[k8s_openapi::api::networking::v1::NetworkPolicy],
        options: &mut CompileOptions,
    ) {
        let pods = state.pods.len();
        match rng.below(9) {
            0..=2 => {
                let i = rng.below(pods);
                let role = *rng.pick(&[None, Some("web"), Some("db")]);
                match role {
                    Some(r) => state.pods[i].labels.insert("role".into(), r.into()),
                    None => state.pods[i].labels.remove("role"),
                };
            }
            3 => {
                let i = rng.below(pods);
                state.pods[i].node = rng.pick(&["n1", "n2", "n3"]).to_string();
            }
            4 => {
                // A pod goes, or comes back with a fresh IP.
                let i = rng.below(pods);
                if state.pods[i].ips.is_empty() || rng.below(2) == 0 {
                    let last = 100 + rng.below(100) as u8;
                    state.pods[i].ips = vec![IpAddr::from([10, 244, 3, last])];
                } else {
                    state.pods.remove(i);
                }
            }
            5 => {
                let p = rng.pick(pool).clone();
                let name = p.metadata.name.clone();
                if let Some(at) = state.policies.iter().position(|q| q.metadata.name == name) {
                    state.policies.remove(at);
                } else {
                    state.policies.push(p);
                }
            }
            6 => {
                let ns = rng.below(state.namespaces.len());
                let env = *rng.pick(&["prod", "dev"]);
                state.namespaces[ns].labels.insert("env".into(), env.into());
            }
            7 => {
                // An IPv6 address, and the label v6-peers selects peers by.
                let i = rng.below(pods);
                let v6: IpAddr = format!("fd00::{}", 1 + rng.below(50)).parse().unwrap();
                if !state.pods[i].ips.contains(&v6) {
                    state.pods[i].ips.push(v6);
                }
                state.pods[i].labels.insert("v6".into(), "yes".into());
            }
            _ => {
                options.log_allowed = !options.log_allowed;
            }
        }
        if state.pods.is_empty() {
            *state = e2e_state(Vec::new());
        }
    }

    #[test]
    fn property_a_delta_turns_the_old_ruleset_into_the_new() {
        let pool = policy_pool();
        let mut steps = 0;
        let mut non_empty = 0;
        let mut seen = HashSet::new();
        for seed in 1..=12u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut state = e2e_state(pool[..2].to_vec());
            state.namespaces.push(NamespaceInfo {
                name: "w".into(),
                labels: [("env".to_string(), "prod".to_string())].into(),
            });
            let mut opts = options();
            let node = [IpAddr::from([10, 244, 0, 1])];
            let mut old = render(&compile_with(&state, "n1", &node, &opts), None);
            for _ in 0..60 {
                mutate(&mut rng, &mut state, &pool, &mut opts);
                let model = compile_with(&state, "n1", &node, &opts);
                let new = render(&model, Some(&old));
                let d = delta(&old, &new);
                let mut sim = load(&old);
                for op in &d.ops {
                    apply(&mut sim, op)
                        .unwrap_or_else(|e| panic!("seed {seed}: {e}\nscript:\n{}", d.script()));
                }
                assert_eq!(sim, load(&new), "seed {seed}: delta:\n{}", d.script());
                // The named model renders the same ruleset as a fresh render, up to names.
                let fresh = render(&model, None);
                assert_eq!(
                    new.tables
                        .iter()
                        .map(|t| t.objects.len())
                        .collect::<Vec<_>>(),
                    fresh
                        .tables
                        .iter()
                        .map(|t| t.objects.len())
                        .collect::<Vec<_>>()
                );
                assert!(delta(&new, &render(&model, Some(&new))).is_empty());
                steps += 1;
                non_empty += usize::from(!d.is_empty());
                for op in &d.ops {
                    seen.insert(std::mem::discriminant(op));
                }
                old = new;
            }
        }
        assert!(
            non_empty > steps / 5,
            "{non_empty} of {steps} steps changed something"
        );
        assert_eq!(seen.len(), 6, "every kind of operation was exercised");
    }

    #[test]
    fn the_simulator_refuses_bad_orders() {
        let mut s = web_state();
        let first = rendered(&s, None);
        set_label(&mut s, "x", "a", "pod", Some("zz"));
        let second = rendered(&s, Some(&first));
        let d = delta(&first, &second);
        assert!(d.ops.iter().any(|op| matches!(
            op,
            Op::Delete {
                kind: ObjectKind::Chain,
                ..
            }
        )));
        // Deleting the chain before the map element that jumps to it must fail.
        let mut reversed = d.ops.clone();
        reversed.reverse();
        let mut sim = load(&first);
        assert!(reversed
            .iter()
            .try_for_each(|op| apply(&mut sim, op))
            .is_err());
        let _ = ip_of("x", "a");
    }
}
