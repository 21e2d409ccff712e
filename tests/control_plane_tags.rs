//! Every lab test file says which control planes it runs on, in one line of its module doc:
//! `//! Control planes: both …` (`./scripts/test.sh` runs it on the stand-in, then again with
//! `VEILNET_LAB_CONTROL_PLANE=kubernetes`), or `//! Control plane: <plane> only, because …`.
//! test.sh picks the second pass's files by that first line, so a lab file without either would
//! silently run on one control plane only. Pure: reads the source files.

use std::path::Path;

const BOTH: &str = "//! Control planes: both";
const ONE: &str = "//! Control plane: ";

#[test]
fn every_lab_test_file_names_its_control_planes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut lab_files = 0;
    let mut problems = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        if !text.contains(concat!("Lab::", "up")) {
            continue;
        }
        lab_files += 1;
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let tags: Vec<&str> = text
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .filter(|l| l.starts_with(BOTH) || l.starts_with(ONE))
            .collect();
        match tags.as_slice() {
            [tag] if tag.starts_with(BOTH) => {}
            [tag] => {
                let rest = &tag[ONE.len()..];
                let plane_ok = ["stand-in only, because ", "kubernetes only, because "]
                    .iter()
                    .any(|p| rest.starts_with(p) && rest.len() > p.len());
                if !plane_ok {
                    problems.push(format!(
                        "{name}: {tag:?} must read `Control plane: stand-in|kubernetes only, because <why>`"
                    ));
                }
            }
            [] => problems.push(format!(
                "{name}: no `{BOTH}` or `{ONE}<plane> only, because …` line in its module doc"
            )),
            _ => problems.push(format!(
                "{name}: more than one control-plane line: {tags:?}"
            )),
        }
    }
    assert!(
        lab_files >= 10,
        "found only {lab_files} lab test files in {dir:?}"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn test_sh_reruns_the_files_tagged_both_on_the_real_control_plane() {
    let script =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test.sh")).unwrap();
    assert!(script.contains(BOTH), "test.sh does not select by {BOTH:?}");
    assert!(
        script.contains("VEILNET_LAB_CONTROL_PLANE=kubernetes"),
        "test.sh does not run a pass on the real control plane"
    );
}
