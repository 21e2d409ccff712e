//! The one nftables runner of the agent: both the policy applier (`policy::apply`) and the wire
//! rules (`kernel::wire`) hand their scripts here, and get [`NetfilterError`] back.
//!
//! Scripts run **in-process through libnftables** (`libnftables.so.1`, the library the `nft`
//! binary is a thin front-end of: same parser, same single netlink batch per script), opened with
//! `dlopen(3)` at first use. Spawning `nft` for every change needs a fork/exec, pipes and a free
//! process slot: a process out of file descriptors (issue 23.3) or PIDs could not load a new
//! policy at all. In-process, a script costs one netlink socket for the length of the call.
//! Only when the library cannot be loaded (a host without it) does the runner fall back to
//! spawning `nft`, and says so once in the log.
//!
//! A libnftables context opens its netlink socket in the network namespace of the calling thread.
//! Every call creates its context, runs one script and frees it on the same thread, so the
//! script lands in that thread's namespace — the caller's, or `netns` entered on a dedicated
//! thread through [`crate::netns::run_in`]. Calls are serialised: libnftables keeps some
//! process-wide state (its symbol tables, gmp allocators) and is not documented as thread-safe.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use super::NetfilterError;
use crate::netns;

/// How a script runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags {
    /// Check against the kernel without committing (`nft -c`).
    pub dry_run: bool,
    /// JSON output (`nft -j`).
    pub json: bool,
}

/// Which implementation runs scripts (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Library,
    Binary,
}

/// Runs `script` (nft's command language, as `nft -f` reads it) inside `netns` (`None`: the
/// calling thread's namespace) and returns what nft printed.
pub fn run(
    netns_name: Option<&str>,
    script: &str,
    flags: Flags,
    action: &str,
) -> Result<String, NetfilterError> {
    match netns_name {
        None => run_here(script, flags, action),
        Some(ns) => {
            let (script, action) = (script.to_string(), action.to_string());
            netns::run_in(ns, move || run_here(&script, flags, &action))?
        }
    }
}

/// [`run`] in the calling thread's namespace.
pub fn run_here(script: &str, flags: Flags, action: &str) -> Result<String, NetfilterError> {
    match library() {
        Some(lib) => lib.run(script, flags, action),
        None => run_binary(script, flags, action),
    }
}

/// The backend [`run`] uses in this process.
pub fn backend() -> Backend {
    if library().is_some() {
        Backend::Library
    } else {
        Backend::Binary
    }
}

/// Environment variable that forces the `nft` binary (`VEILNET_NFT=binary`), for tests and for
/// an operator who suspects the library.
pub const BACKEND_ENV: &str = "VEILNET_NFT";

/// The soname Debian's `libnftables1` ships (and `nft` links against).
const SONAME: &CStr = c"libnftables.so.1";

// From <nftables/libnftables.h>.
const NFT_CTX_DEFAULT: c_uint = 0;
const NFT_CTX_OUTPUT_JSON: c_uint = 1 << 4;

// The entry points' C prototypes. No crate in the tree wraps libnftables (the `nftables` crate
// spawns the binary; `libloading` is not in the tree), so the library is opened with
// `dlopen(3)` and called through these pointer types; each FFI block below states its
// `SAFETY` reasoning.
type CtxNew = unsafe extern "C" fn(c_uint) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxBuffer = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxGetBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type CtxSetDryRun = unsafe extern "C" fn(*mut c_void, bool);
type CtxOutputSetFlags = unsafe extern "C" fn(*mut c_void, c_uint);
type RunCmdFromBuffer = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// libnftables' entry points. The library handle is never closed (it lives as long as the
/// process), so the function pointers stay valid.
struct Library {
    ctx_new: CtxNew,
    ctx_free: CtxFree,
    buffer_output: CtxBuffer,
    buffer_error: CtxBuffer,
    get_output: CtxGetBuffer,
    get_error: CtxGetBuffer,
    set_dry_run: CtxSetDryRun,
    output_set_flags: CtxOutputSetFlags,
    run_cmd: RunCmdFromBuffer,
}

/// Serialises every libnftables call (see the module documentation).
static CALLS: Mutex<()> = Mutex::new(());

fn library() -> Option<&'static Library> {
    static LIB: OnceLock<Option<Library>> = OnceLock::new();
    LIB.get_or_init(|| {
        if std::env::var(BACKEND_ENV).is_ok_and(|v| v == "binary") {
            tracing::info!("{BACKEND_ENV}=binary: nft scripts run through the nft binary");
            return None;
        }
        match Library::open() {
            Ok(lib) => Some(lib),
            Err(reason) => {
                tracing::warn!(reason = %reason, "libnftables cannot be loaded; nft scripts run through the nft binary (a process per change)");
                None
            }
        }
    })
    .as_ref()
}

fn dlerror() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string owned by libc, valid until the next
    // dl* call on this thread; it is copied at once.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown dlopen error".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

impl Library {
    fn open() -> Result<Library, String> {
        // SAFETY: dlopen with a constant NUL-terminated soname; libnftables' constructors only
        // initialise its own state.
        let handle = unsafe { libc::dlopen(SONAME.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(dlerror());
        }
        let sym = |name: &CStr| -> Result<*mut c_void, String> {
            // SAFETY: `handle` is a live handle from dlopen (never closed); `name` is
            // NUL-terminated.
            let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
            if p.is_null() {
                Err(format!("{}: {}", name.to_string_lossy(), dlerror()))
            } else {
                Ok(p)
            }
        };
        // SAFETY (each transmute): the symbol is libnftables' function of that name, whose C
        // prototype in <nftables/libnftables.h> is exactly the pointer type it is cast to.
        unsafe {
            Ok(Library {
                ctx_new: std::mem::transmute::<*mut c_void, CtxNew>(sym(c"nft_ctx_new")?),
                ctx_free: std::mem::transmute::<*mut c_void, CtxFree>(sym(c"nft_ctx_free")?),
                buffer_output: std::mem::transmute::<*mut c_void, CtxBuffer>(sym(
                    c"nft_ctx_buffer_output",
                )?),
                buffer_error: std::mem::transmute::<*mut c_void, CtxBuffer>(sym(
                    c"nft_ctx_buffer_error",
                )?),
                get_output: std::mem::transmute::<*mut c_void, CtxGetBuffer>(sym(
                    c"nft_ctx_get_output_buffer",
                )?),
                get_error: std::mem::transmute::<*mut c_void, CtxGetBuffer>(sym(
                    c"nft_ctx_get_error_buffer",
                )?),
                set_dry_run: std::mem::transmute::<*mut c_void, CtxSetDryRun>(sym(
                    c"nft_ctx_set_dry_run",
                )?),
                output_set_flags: std::mem::transmute::<*mut c_void, CtxOutputSetFlags>(sym(
                    c"nft_ctx_output_set_flags",
                )?),
                run_cmd: std::mem::transmute::<*mut c_void, RunCmdFromBuffer>(sym(
                    c"nft_run_cmd_from_buffer",
                )?),
            })
        }
    }

    fn run(&self, script: &str, flags: Flags, action: &str) -> Result<String, NetfilterError> {
        let buf = CString::new(script).map_err(|_| NetfilterError::NftNul {
            action: action.to_string(),
        })?;
        let _serial = CALLS.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: every pointer is a libnftables entry point of the matching prototype (see
        // `Library::open`). nft_ctx_new returns a fresh context or NULL (checked); the context is
        // used only on this thread, under CALLS, and freed exactly once, on the only path past
        // its creation. `buf` is NUL-terminated and outlives the run. The output and error
        // buffers are NULL or NUL-terminated strings owned by the context, copied out before it
        // is freed.
        unsafe {
            let ctx = (self.ctx_new)(NFT_CTX_DEFAULT);
            if ctx.is_null() {
                return Err(NetfilterError::NftIo {
                    action: action.to_string(),
                    source: std::io::Error::last_os_error(),
                });
            }
            (self.buffer_output)(ctx);
            (self.buffer_error)(ctx);
            if flags.dry_run {
                (self.set_dry_run)(ctx, true);
            }
            if flags.json {
                (self.output_set_flags)(ctx, NFT_CTX_OUTPUT_JSON);
            }
            let rc = (self.run_cmd)(ctx, buf.as_ptr());
            let copy = |p: *const c_char| {
                if p.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(p).to_string_lossy().into_owned()
                }
            };
            let out = copy((self.get_output)(ctx));
            let err = copy((self.get_error)(ctx));
            (self.ctx_free)(ctx);
            if rc != 0 {
                return Err(NetfilterError::NftRefused {
                    action: action.to_string(),
                    message: err.trim().to_string(),
                });
            }
            Ok(out)
        }
    }
}

/// `nft [-c] [-j] -f -` with `script` on stdin, in the calling thread's namespace (a child
/// spawned without `pre_exec` inherits the thread's namespace).
fn run_binary(script: &str, flags: Flags, action: &str) -> Result<String, NetfilterError> {
    let mut cmd = Command::new("nft");
    if flags.dry_run {
        cmd.arg("-c");
    }
    if flags.json {
        cmd.arg("-j");
    }
    cmd.args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let io = |source| NetfilterError::NftIo {
        action: action.to_string(),
        source,
    };
    let mut child = cmd.spawn().map_err(io)?;
    if let Some(mut pipe) = child.stdin.take() {
        // nft reads the whole script before it answers, so writing first cannot deadlock on a
        // full stdout pipe.
        pipe.write_all(script.as_bytes()).map_err(io)?;
    }
    let out = child.wait_with_output().map_err(io)?;
    if !out.status.success() {
        return Err(NetfilterError::NftRefused {
            action: action.to_string(),
            message: format!(
                "({}) {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_loads_and_parses_like_nft() {
        if !std::path::Path::new("/lib/x86_64-linux-gnu/libnftables.so.1").exists()
            && !std::path::Path::new("/usr/lib/x86_64-linux-gnu/libnftables.so.1").exists()
        {
            eprintln!("libnftables.so.1 not installed; skipped");
            return;
        }
        let lib = Library::open().expect("libnftables loads");
        // A syntax error is refused by the parser, before anything reaches the kernel.
        let e = lib
            .run(
                "table inet x { chain c { bogus } }\n",
                Flags::default(),
                "t",
            )
            .unwrap_err();
        match e {
            NetfilterError::NftRefused { message, .. } => {
                assert!(message.contains("syntax error"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            lib.run("a\0b", Flags::default(), "t"),
            Err(NetfilterError::NftNul { .. })
        ));
    }

    #[test]
    fn the_binary_fallback_reports_nfts_error() {
        if Command::new("nft").arg("--version").output().is_err() {
            eprintln!("nft not installed; skipped");
            return;
        }
        match run_binary(
            "table inet x { chain c { bogus } }\n",
            Flags::default(),
            "t",
        ) {
            Err(NetfilterError::NftRefused { message, .. }) => {
                assert!(message.contains("syntax error"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }
}
