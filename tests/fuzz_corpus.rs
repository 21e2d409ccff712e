//! The fuzz corpus (`fuzz/corpus/<target>/`) replayed through `veilnet::fuzzing` on stable Rust:
//! every committed seed, and a few thousand deterministic mutations of each (bit flips, byte
//! changes, truncations, splices). Coverage-guided fuzzing is `scripts/fuzz.sh` (nightly); this
//! keeps each input it ever found a regression test, and checks that every seed still parses
//! (a seed named `bad_*` must not), so no target silently fuzzes nothing. The NetworkPolicy
//! seeds' rendered rulesets must pass `nft -c` in a namespace of this test's own (root only).

use std::path::{Path, PathBuf};

type Target = fn(&[u8]) -> bool;

const TARGETS: &[(&str, Target)] = &[
    ("wg_datagrams", veilnet::fuzzing::wg_datagrams),
    ("node_objects", veilnet::fuzzing::node_objects),
    ("datapath_request", veilnet::fuzzing::datapath_request),
    ("admission_line", veilnet::fuzzing::admission_line),
    ("cni_input", veilnet::fuzzing::cni_input),
    ("netlink_dumps", veilnet::fuzzing::netlink_dumps),
    ("dns_messages", veilnet::fuzzing::dns_messages),
    ("flow_lines", veilnet::fuzzing::flow_lines),
    ("network_policies", |d| {
        veilnet::fuzzing::network_policies(d).is_some()
    }),
];

/// Mutations per seed.
const MUTANTS: usize = 1500;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no seed", dir.display());
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// xorshift64*: deterministic, so a failure reproduces from the seed file and the mutant number.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] ^= 1 << rng.below(8);
            }
            1 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] = [0, 0xff, b'"', b'{', b'-', b'9', b'/', b':'][rng.below(8)];
            }
            2 => d.truncate(rng.below(d.len() + 1)),
            3 => {
                let i = rng.below(d.len() + 1);
                let b = rng.next() as u8;
                d.insert(i, b);
            }
            4 if !other.is_empty() => {
                // Splice a piece of another seed in.
                let (a, n) = (rng.below(other.len()), 1 + rng.below(64));
                let piece = &other[a..(a + n).min(other.len())];
                let i = rng.below(d.len() + 1);
                d.splice(i..i, piece.iter().copied());
            }
            _ if !d.is_empty() => {
                // Duplicate a range (repeated fields, nested structures).
                let a = rng.below(d.len());
                let b = (a + 1 + rng.below(32)).min(d.len());
                let piece = d[a..b].to_vec();
                d.splice(b..b, piece);
            }
            _ => {}
        }
    }
    d
}

#[test]
fn every_seed_parses_and_no_mutant_breaks_an_invariant() {
    for (name, target) in TARGETS {
        let seeds = corpus(name);
        for (path, bytes) in &seeds {
            let bad = path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("bad_");
            assert_eq!(
                target(bytes),
                !bad,
                "{}: the seed {} parse",
                path.display(),
                if bad { "should not" } else { "does not" }
            );
        }
        for (n, (path, bytes)) in seeds.iter().enumerate() {
            let other = &seeds[(n + 1) % seeds.len()].1;
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((n as u64 + 1) * 0x1000_0000_01b3));
            for m in 0..MUTANTS {
                let mutant = mutate(&mut rng, bytes, other);
                let outcome = std::panic::catch_unwind(|| target(&mutant));
                assert!(
                    outcome.is_ok(),
                    "{name}: mutant {m} of {} broke an invariant; input: {mutant:02x?}",
                    path.display()
                );
            }
        }
        eprintln!("{name}: {} seeds, {} mutants each", seeds.len(), MUTANTS);
    }
}

#[test]
fn the_policy_seeds_render_rulesets_nft_accepts() {
    veilnet_test_support::require_root!();
    let ns = veilnet_test_support::Netns::new("veilfz", "nft");
    for (path, bytes) in corpus("network_policies") {
        let script = veilnet::fuzzing::network_policies(&bytes)
            .unwrap_or_else(|| panic!("{} does not decode", path.display()));
        veilnet::netfilter::nft::run(
            Some(ns.name()),
            &script,
            veilnet::netfilter::nft::Flags {
                dry_run: true,
                json: false,
            },
            "checking a rendered ruleset",
        )
        .unwrap_or_else(|e| panic!("{}: nft -c refused the ruleset: {e}", path.display()));
    }
}
