//! WireGuard key handling: generation, the on-disk private key file, and the base64 text form of
//! public keys that travels through Node annotations.
//!
//! The private key file holds the standard `wg genkey` format (44 characters of standard base64
//! and a newline), so operators can inspect it with the usual tools. It is written atomically with
//! mode 0600 and refused when anyone but the owner could read it: a leaked node key lets an
//! attacker impersonate the node to every peer until the key is rotated.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
pub use boringtun::x25519::{PublicKey, StaticSecret};

/// Length in bytes of every WireGuard key.
pub const KEY_LEN: usize = 32;
/// Length of a key in standard padded base64.
pub const KEY_B64_LEN: usize = 44;
/// Mode of the private key file: owner read/write only.
pub const KEY_FILE_MODE: u32 = crate::fsutil::PRIVATE_FILE_MODE;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{what} is not {KEY_B64_LEN} characters of standard base64 (got {len} characters)")]
    BadLength { what: &'static str, len: usize },
    #[error("{what} is not valid standard base64: {source}")]
    BadBase64 {
        what: &'static str,
        source: base64::DecodeError,
    },
    #[error("{what} is the all-zero key, which WireGuard rejects")]
    ZeroKey { what: &'static str },
    #[error("private key file {path} has mode {mode:o}; it must not be accessible by group or others (expected 0600)")]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("private key file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("private key file {path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A fresh random private key.
pub fn generate() -> StaticSecret {
    // x25519 clamps the scalar when it is used, so any 32 random bytes make a valid key.
    StaticSecret::from(rand::random::<[u8; KEY_LEN]>())
}

/// The public key of `private`.
pub fn public_key(private: &StaticSecret) -> PublicKey {
    PublicKey::from(private)
}

/// Standard padded base64 of a public key, as `wg pubkey` prints it.
pub fn encode_public(key: &PublicKey) -> String {
    STANDARD.encode(key.as_bytes())
}

/// Parses a public key strictly: exactly 44 characters of standard padded base64 (no whitespace,
/// no URL-safe alphabet), 32 bytes, not all zero.
pub fn decode_public(text: &str) -> Result<PublicKey, KeyError> {
    decode_key(text, "public key").map(PublicKey::from)
}

/// Standard padded base64 of a private key (the key file format, without the newline).
pub fn encode_private(key: &StaticSecret) -> String {
    STANDARD.encode(key.to_bytes())
}

/// Parses a private key with the same strict rules as [`decode_public`].
pub fn decode_private(text: &str) -> Result<StaticSecret, KeyError> {
    decode_key(text, "private key").map(StaticSecret::from)
}

/// A short, stable label of a public key for logs and status output (not a security check: two
/// keys can share it; compare full keys for that).
pub fn fingerprint(key: &PublicKey) -> String {
    let full = encode_public(key);
    format!("{}…", &full[..8])
}

fn decode_key(text: &str, what: &'static str) -> Result<[u8; KEY_LEN], KeyError> {
    if text.len() != KEY_B64_LEN {
        return Err(KeyError::BadLength {
            what,
            len: text.len(),
        });
    }
    let mut bytes = [0u8; KEY_LEN];
    // 44 padded characters always decode to at most 33 bytes; anything but 32 is malformed.
    let n = STANDARD
        .decode_slice(text, &mut bytes)
        .map_err(|e| match e {
            base64::DecodeSliceError::DecodeError(source) => KeyError::BadBase64 { what, source },
            base64::DecodeSliceError::OutputSliceTooSmall => KeyError::BadLength {
                what,
                len: text.len(),
            },
        })?;
    if n != KEY_LEN {
        return Err(KeyError::BadLength {
            what,
            len: text.len(),
        });
    }
    if bytes == [0u8; KEY_LEN] {
        return Err(KeyError::ZeroKey { what });
    }
    Ok(bytes)
}

/// Loads the private key at `path`, or creates it (mode 0600, atomically) when the file does not
/// exist. An existing file with group/other permission bits, or that does not hold exactly one
/// key, is an error: silently replacing it would change the node's identity.
pub fn load_or_create(path: &Path) -> Result<StaticSecret, KeyError> {
    match fs::symlink_metadata(path) {
        Ok(_) => load(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate();
            write_atomic(path, &key)?;
            Ok(key)
        }
        Err(source) => Err(KeyError::Io {
            action: "inspecting",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Loads an existing private key file, checking its type, permissions and contents.
pub fn load(path: &Path) -> Result<StaticSecret, KeyError> {
    let io = |action| {
        let path = path.to_path_buf();
        move |source| KeyError::Io {
            action,
            path,
            source,
        }
    };
    let meta = fs::symlink_metadata(path).map_err(io("inspecting"))?;
    if !meta.file_type().is_file() {
        return Err(KeyError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let raw = fs::read(path).map_err(io("reading"))?;
    let text = std::str::from_utf8(&raw).map_err(|_| KeyError::BadFile {
        path: path.to_path_buf(),
        reason: "not UTF-8 text".into(),
    })?;
    // The file format allows exactly one trailing newline, as `wg genkey > file` writes it.
    let body = text.strip_suffix('\n').unwrap_or(text);
    decode_private(body).map_err(|e| KeyError::BadFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Writes `key` to `path` through a 0600 temporary file in the same directory, fsync and rename,
/// so a crash leaves either the old file or the complete new one, never a partial key.
pub fn write_atomic(path: &Path, key: &StaticSecret) -> Result<(), KeyError> {
    let io = |action, p: &Path| {
        let p = p.to_path_buf();
        move |source| KeyError::Io {
            action,
            path: p,
            source,
        }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io("creating directory", dir))?;
    }
    crate::fsutil::write_private(path, format!("{}\n", encode_private(key)).as_bytes())
        .map_err(io("writing", path))
}

/// Serde support for a public key as its base64 text (the form of annotations and `wg`).
pub mod serde_public {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::PublicKey;

    pub fn serialize<S: Serializer>(key: &PublicKey, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::encode_public(key))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PublicKey, D::Error> {
        let text = String::deserialize(d)?;
        super::decode_public(&text).map_err(serde::de::Error::custom)
    }
}

/// [`serde_public`] for a list of keys.
pub mod serde_public_list {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::PublicKey;

    pub fn serialize<S: Serializer>(keys: &[PublicKey], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(keys.iter().map(super::encode_public))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PublicKey>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|t| super::decode_public(t).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn public_key_round_trip() {
        let key = public_key(&generate());
        let text = encode_public(&key);
        assert_eq!(text.len(), KEY_B64_LEN);
        assert_eq!(decode_public(&text).unwrap().as_bytes(), key.as_bytes());
        assert!(fingerprint(&key).starts_with(&text[..8]));
    }

    #[test]
    fn decode_is_strict() {
        let good = encode_public(&public_key(&generate()));
        // Whitespace, truncation, extra characters.
        assert!(matches!(
            decode_public(&format!("{good}\n")),
            Err(KeyError::BadLength { len: 45, .. })
        ));
        assert!(matches!(
            decode_public(&good[..43]),
            Err(KeyError::BadLength { .. })
        ));
        assert!(matches!(decode_public(""), Err(KeyError::BadLength { .. })));
        // 44 characters, but not base64 / the URL-safe alphabet / misplaced padding.
        let bad = format!("{}!", &good[..43]);
        assert!(matches!(
            decode_public(&bad),
            Err(KeyError::BadBase64 { .. })
        ));
        let urlsafe = "-".repeat(43) + "=";
        assert!(matches!(
            decode_public(&urlsafe),
            Err(KeyError::BadBase64 { .. })
        ));
        let no_pad = "A".repeat(44);
        assert!(decode_public(&no_pad).is_err(), "33 bytes is not a key");
        // Non-canonical trailing bits are rejected too.
        let mut noncanon = good[..42].to_string();
        noncanon.push('B');
        noncanon.push('=');
        if STANDARD.encode(STANDARD.decode(&noncanon).unwrap_or_default()) != noncanon {
            assert!(decode_public(&noncanon).is_err());
        }
        assert!(matches!(
            decode_public(&STANDARD.encode([0u8; 32])),
            Err(KeyError::ZeroKey { .. })
        ));
    }

    #[test]
    fn key_file_is_created_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/wg.key");
        let created = load_or_create(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), KEY_B64_LEN + 1);
        assert!(text.ends_with('\n'));
        let again = load_or_create(&path).unwrap();
        assert_eq!(again.to_bytes(), created.to_bytes());
        // No temporary files are left behind.
        let entries: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(entries.len(), 1);
    }

    #[test]
    fn key_file_with_open_permissions_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wg.key");
        write_atomic(&path, &generate()).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(&path).err().unwrap();
        assert!(
            matches!(err, KeyError::InsecurePermissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("0600"));
        // The refused file is left untouched, never silently regenerated.
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o644);
    }

    #[test]
    fn key_file_with_bad_contents_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cases: &[(&str, &[u8])] = &[
            ("short", b"c2hvcnQ=\n"),
            (
                "long",
                b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n",
            ),
            ("notb64", b"!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!=\n"),
            ("twonl", b"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n\n"),
            ("binary", &[0xff; 32]),
            ("empty", b""),
        ];
        for (name, contents) in cases {
            let path = dir.path().join(name);
            fs::write(&path, contents).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let err = load_or_create(&path).err().unwrap();
            assert!(matches!(err, KeyError::BadFile { .. }), "{name}: {err}");
            assert_eq!(fs::read(&path).unwrap(), *contents, "{name} was modified");
        }
        // The same key without a trailing newline is fine.
        let path = dir.path().join("nonl");
        fs::write(&path, "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load(&path).unwrap().to_bytes(), [1u8; 32]);
    }

    #[test]
    fn key_file_that_is_a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_or_create(dir.path()).err().unwrap();
        assert!(matches!(err, KeyError::NotAFile { .. }), "{err}");
    }
}
