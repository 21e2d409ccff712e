//! The one atomic file writer of the plugin and the agent (the agent's `fsutil` wraps it).
//!
//! A temporary file beside the target, then `rename(2)`: a reader never sees a half-written file.
//! The temporary file is created with `O_CREAT | O_EXCL | O_NOFOLLOW` under a name nobody can
//! predict (`.tmp.<name>.<pid>.<random>`), so a file or symlink planted in the directory is never
//! opened, let alone written through: with `O_EXCL` the kernel refuses any existing name, a
//! symlink included, wherever it points. A target that is itself a symlink is refused too (a
//! rename would replace the link, but a link where veilnet keeps its state means someone put it
//! there).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Prefix of every temporary file; the IPAM garbage collector removes leftovers by it.
pub const TMP_PREFIX: &str = ".tmp.";

/// How [`write_atomic`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOptions {
    /// Exact mode of the new file, whatever the umask.
    pub mode: u32,
    /// fsync the file before the rename and the directory after it, so a crash leaves the old
    /// file or the complete new one.
    pub durable: bool,
}

impl WriteOptions {
    /// World-readable state (0644), not fsync'ed.
    pub const STATE: WriteOptions = WriteOptions {
        mode: 0o644,
        durable: false,
    };
    /// World-readable state (0644), fsync'ed.
    pub const DURABLE: WriteOptions = WriteOptions {
        mode: 0o644,
        durable: true,
    };
    /// Secrets (0600), fsync'ed.
    pub const PRIVATE: WriteOptions = WriteOptions {
        mode: 0o600,
        durable: true,
    };
}

/// A random 64-bit value from the kernel (getrandom(2)).
fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    if getrandom::fill(&mut buf).is_err() {
        // Never fails for 8 bytes once the pool is initialised; fall back to the clock.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ u64::from(std::process::id()).rotate_left(32);
    }
    u64::from_ne_bytes(buf)
}

/// Replaces `path` with `bytes` atomically (see the module documentation). The parent directory
/// must exist. Fails with [`std::io::ErrorKind::InvalidInput`] when `path` is a symlink, and
/// leaves no temporary file behind on any failure.
pub fn write_atomic(path: &Path, bytes: &[u8], opts: WriteOptions) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name")
    })?;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("refusing to replace {}: it is a symlink", path.display()),
        ));
    }
    // A name taken (by a planted file or an astronomically unlikely collision) is retried with
    // another random suffix a few times, then reported.
    let mut attempt = 0;
    let (tmp, mut file) = loop {
        let tmp = dir.join(format!(
            "{TMP_PREFIX}{}.{}.{:016x}",
            name.to_string_lossy(),
            std::process::id(),
            random_u64()
        ));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(opts.mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 3 => {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    };
    let result = (|| {
        file.set_permissions(std::fs::Permissions::from_mode(opts.mode))?;
        file.write_all(bytes)?;
        if opts.durable {
            file.sync_all()?;
        }
        drop(file);
        std::fs::rename(&tmp, path)?;
        if opts.durable {
            File::open(&dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates `dir` and takes an exclusive `flock` on `dir/name` (created if missing; a symlink
/// planted there is refused, not followed): the lock of a store that concurrent plugin
/// invocations share (IPAM, hostPort mappings). Held until the returned lock is dropped. On
/// failure: the operation, the path and the error, for the caller's own error type.
pub fn lock_exclusive(
    dir: &Path,
    name: &str,
) -> Result<nix::fcntl::Flock<File>, (&'static str, PathBuf, std::io::Error)> {
    std::fs::create_dir_all(dir).map_err(|e| ("create directory", dir.to_path_buf(), e))?;
    let path = dir.join(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| ("open lock file", path.clone(), e))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| ("flock", path, errno.into()))
}

/// An iproute2/nftables program by name: the usual sbin/bin directories first (a runtime may
/// call the plugin with a short `PATH`), then `PATH`.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let fixed = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(|d| Path::new(d).join(name));
    let from_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    fixed.into_iter().chain(from_path).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn replaces_the_file_with_its_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one", WriteOptions::STATE).unwrap();
        write_atomic(&p, b"two", WriteOptions::PRIVATE).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(write_atomic(&dir.path().join("missing/x"), b"x", WriteOptions::STATE).is_err());
    }

    #[test]
    fn a_symlink_target_is_refused_and_its_destination_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), b"precious").unwrap();
        let p = dir.path().join("state.json");
        symlink(outside.path(), &p).unwrap();
        let e = write_atomic(&p, b"evil", WriteOptions::DURABLE).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        assert_eq!(std::fs::read(outside.path()).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&p)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
