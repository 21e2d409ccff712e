//! The image recipe end to end: `scripts/build-image.sh` builds the OCI image and verifies it with
//! runc (`veilnet --version` and friends). Ignored by default: a release build takes minutes and
//! the script installs Debian packages. Run with `cargo test --test manifest_image -- --ignored`.

use std::process::Command;

#[test]
#[ignore = "release build + apt; run explicitly"]
fn the_image_recipe_builds_and_verifies_the_image() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(format!("{root}/scripts/build-image.sh"))
        .env("OUT", format!("{root}/target/image-test"))
        .output()
        .expect("run scripts/build-image.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("veilnet {}", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
    let archive = format!(
        "{root}/target/image-test/veilnet-{}.oci.tar",
        env!("CARGO_PKG_VERSION")
    );
    assert!(std::path::Path::new(&archive).is_file(), "{archive}");
}
