//! File helpers shared by the agent, the lab and their state files.

use std::path::Path;

use veilnet_cni::fsutil::WriteOptions;

/// Writes `bytes` to `path` atomically (mode 0644): an exclusively created temporary file beside
/// it (`O_CREAT|O_EXCL|O_NOFOLLOW`, an unpredictable name), then a rename, so a reader (the CNI
/// plugin, `veilnet status`, a restarted agent) never sees a half-written file and a symlink
/// planted in the directory is never written through. A `path` that is a symlink is refused. The
/// parent directory must exist. One implementation with the plugin's: `veilnet_cni::fsutil`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    veilnet_cni::fsutil::write_atomic(path, bytes, WriteOptions::STATE)
}

/// [`write_atomic`] for secrets (private keys, the datapath's saved configuration): the temporary
/// file is created with mode 0600 (exactly, whatever the umask), so the secret is never readable
/// by anyone else, not even for a moment; it is fsync'ed before the rename and the directory
/// after it, so a crash leaves the old file or the complete new one.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    veilnet_cni::fsutil::write_atomic(path, bytes, WriteOptions::PRIVATE)
}

/// Mode of files that hold secrets: owner read/write only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(write_atomic(&dir.path().join("missing/x"), b"x").is_err());
    }

    #[test]
    fn private_files_are_0600_whatever_the_umask_and_leave_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        write_private(&p, b"one").unwrap();
        write_private(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(write_private(&dir.path().join("missing/x"), b"x").is_err());
    }

    #[test]
    fn planted_symlinks_are_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let p = dir.path().join("node-state.json");
        // The temporary name the agent used before (`<name>.tmp`).
        std::os::unix::fs::symlink(&victim, dir.path().join("node-state.json.tmp")).unwrap();
        write_atomic(&p, b"state").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"state");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // The target a symlink: refused.
        let link = dir.path().join("status.json");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(write_private(&link, b"x").is_err());
        assert!(write_atomic(&link, b"x").is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }
}
