//! The real control plane's certificates and keys, made per lab with Debian's `openssl` CLI (one
//! command per file; scripts/common.sh installs it), so the lab needs no certificate crate.
//!
//! One CA signs everything: the apiserver's serving certificate (its underlay address, loopback
//! and the in-cluster names) and the client certificates (admin in `system:masters`, the
//! controller manager, the scheduler, one `system:node:<name>` per lab kubelet). A separate EC key
//! signs and verifies ServiceAccount tokens. Keys are P-256 (fast to make, accepted by Go and by
//! rustls) and never leave the lab's directory. Idempotent: existing files are kept.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("failed to run openssl (apt install openssl): {0}")]
    Spawn(std::io::Error),
    #[error("openssl {what} failed: {stderr}")]
    Openssl { what: String, stderr: String },
    #[error("failed to write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, PkiError>;

/// Days every certificate of a lab is valid (a lab lives for minutes to days).
const VALID_DAYS: &str = "3650";

/// Where a lab's certificates and keys are.
#[derive(Clone, Debug)]
pub struct Pki {
    dir: PathBuf,
}

/// One client identity: the certificate's CN is the user, each O a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdentity {
    /// File stem (`admin`, `node-1`, …).
    pub file: String,
    pub user: String,
    pub groups: Vec<String>,
}

impl ClientIdentity {
    pub fn new(file: &str, user: &str, groups: &[&str]) -> Self {
        Self {
            file: file.into(),
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }
}

impl Pki {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn serving_cert(&self) -> PathBuf {
        self.dir.join("apiserver.crt")
    }
    pub fn serving_key(&self) -> PathBuf {
        self.dir.join("apiserver.key")
    }
    pub fn sa_key(&self) -> PathBuf {
        self.dir.join("sa.key")
    }
    pub fn sa_pub(&self) -> PathBuf {
        self.dir.join("sa.pub")
    }
    pub fn client_cert(&self, id: &ClientIdentity) -> PathBuf {
        self.dir.join(format!("{}.crt", id.file))
    }
    pub fn client_key(&self, id: &ClientIdentity) -> PathBuf {
        self.dir.join(format!("{}.key", id.file))
    }

    /// Makes whatever is missing: the CA, the serving certificate for `sans`
    /// (`IP:…`/`DNS:…` entries), the ServiceAccount key pair and every client certificate.
    pub fn ensure(&self, lab: &str, sans: &[String], clients: &[ClientIdentity]) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|source| PkiError::Io {
            path: self.dir.clone(),
            source,
        })?;
        if !self.ca_cert().exists() || !self.ca_key().exists() {
            self.issue(
                &self.ca_key(),
                &self.ca_cert(),
                &format!("/CN=veilnet-lab-{lab}-ca"),
                "basicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign, digitalSignature\nsubjectKeyIdentifier = hash\n",
                false,
            )?;
        }
        if !self.serving_cert().exists() {
            self.issue(
                &self.serving_key(),
                &self.serving_cert(),
                "/CN=kube-apiserver",
                &format!(
                    "{LEAF}extendedKeyUsage = serverAuth\nsubjectAltName = {}\n",
                    sans.join(", ")
                ),
                true,
            )?;
        }
        if !self.sa_pub().exists() {
            openssl(
                "genpkey (ServiceAccount key)",
                &[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                    &path_str(&self.sa_key()),
                ],
            )?;
            openssl(
                "pkey -pubout",
                &[
                    "pkey",
                    "-in",
                    &path_str(&self.sa_key()),
                    "-pubout",
                    "-out",
                    &path_str(&self.sa_pub()),
                ],
            )?;
        }
        for id in clients {
            if self.client_cert(id).exists() {
                continue;
            }
            let mut subject = String::new();
            for g in &id.groups {
                subject.push_str(&format!("/O={g}"));
            }
            subject.push_str(&format!("/CN={}", id.user));
            self.issue(
                &self.client_key(id),
                &self.client_cert(id),
                &subject,
                &format!("{LEAF}extendedKeyUsage = clientAuth\n"),
                true,
            )?;
        }
        Ok(())
    }

    /// A new P-256 key and its certificate: self-signed (the CA) or signed by the CA.
    fn issue(
        &self,
        key: &Path,
        cert: &Path,
        subject: &str,
        extensions: &str,
        by_ca: bool,
    ) -> Result<()> {
        // A config of our own, so the system's openssl.cnf adds nothing (its v3_ca section would
        // mark every certificate a CA, which rustls refuses for a server).
        let conf = cert.with_extension("cnf");
        let text = format!(
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\n[ext]\n{extensions}authorityKeyIdentifier = keyid:always\n"
        );
        let text = if by_ca {
            text
        } else {
            text.replace("authorityKeyIdentifier = keyid:always\n", "")
        };
        std::fs::write(&conf, text).map_err(|source| PkiError::Io {
            path: conf.clone(),
            source,
        })?;
        let (key_s, cert_s, conf_s) = (path_str(key), path_str(cert), path_str(&conf));
        let (ca_cert, ca_key) = (path_str(&self.ca_cert()), path_str(&self.ca_key()));
        let mut args = vec![
            "req",
            "-x509",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-keyout",
            &key_s,
            "-out",
            &cert_s,
            "-subj",
            subject,
            "-days",
            VALID_DAYS,
            "-config",
            &conf_s,
            "-extensions",
            "ext",
        ];
        if by_ca {
            args.extend(["-CA", &ca_cert, "-CAkey", &ca_key]);
        }
        let result = openssl(&format!("req {subject}"), &args);
        let _ = std::fs::remove_file(&conf);
        result
    }
}

/// Extensions of every leaf certificate.
const LEAF: &str = "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature, keyEncipherment\n";

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

fn openssl(what: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .map_err(PkiError::Spawn)?;
    if !out.status.success() {
        return Err(PkiError::Openssl {
            what: what.into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openssl_text(args: &[&str]) -> String {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn issues_a_ca_a_serving_cert_and_client_certs_that_verify() {
        if Command::new("openssl").arg("version").output().is_err() {
            eprintln!("skipped: no openssl");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::new(tmp.path().join("pki"));
        let node = ClientIdentity::new("node-1", "system:node:node-1", &["system:nodes"]);
        pki.ensure(
            "t",
            &["IP:172.30.0.1".into(), "DNS:kubernetes".into()],
            std::slice::from_ref(&node),
        )
        .unwrap();
        let ca = path_str(&pki.ca_cert());
        for cert in [pki.serving_cert(), pki.client_cert(&node)] {
            let out = openssl_text(&["verify", "-CAfile", &ca, &path_str(&cert)]);
            assert!(out.contains(": OK"), "{out}");
        }
        let serving = openssl_text(&[
            "x509",
            "-noout",
            "-text",
            "-in",
            &path_str(&pki.serving_cert()),
        ]);
        assert!(serving.contains("IP Address:172.30.0.1"), "{serving}");
        assert!(serving.contains("CA:FALSE"), "{serving}");
        assert!(
            serving.contains("TLS Web Server Authentication"),
            "{serving}"
        );
        let subject = openssl_text(&[
            "x509",
            "-noout",
            "-subject",
            "-in",
            &path_str(&pki.client_cert(&node)),
        ]);
        assert!(subject.contains("O = system:nodes"), "{subject}");
        assert!(subject.contains("CN = system:node:node-1"), "{subject}");
        // Idempotent: a second run keeps the files.
        let before = std::fs::read(pki.ca_cert()).unwrap();
        pki.ensure("t", &[], std::slice::from_ref(&node)).unwrap();
        assert_eq!(before, std::fs::read(pki.ca_cert()).unwrap());
    }
}
