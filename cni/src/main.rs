//! `veilnet-cni`: reads the CNI environment and stdin, runs one command, prints the result or
//! error JSON on stdout and exits non-zero on failure. Logs go to stderr.

#![forbid(unsafe_code)]

use std::io::{Read, Write};

use veilnet_cni::Outcome;

fn main() {
    let mut input = Vec::new();
    let stdin = std::io::stdin().read_to_end(&mut input).map(|_| input);
    let get_env = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    // A bug must still yield a well-formed error result rather than a bare crash.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        veilnet_cni::run(get_env, stdin)
    }))
    .unwrap_or_else(|_| Outcome::internal_error("veilnet-cni panicked; see stderr"));
    let mut stdout = std::io::stdout().lock();
    if !outcome.stdout.is_empty() {
        let _ = writeln!(stdout, "{}", outcome.stdout);
    }
    let _ = stdout.flush();
    std::process::exit(outcome.exit_code);
}
