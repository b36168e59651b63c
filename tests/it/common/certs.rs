//! Certificates made for a test with the `openssl` command line: a certificate
//! authority of its own, and server or client certificates it signs, in a
//! temporary directory removed when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::service_missing;

/// A certificate authority and the certificates it issued.
pub struct TestCa {
    dir: tempfile::TempDir,
    name: String,
}

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A new authority named `name` (its CN); `None` (after noting the skip, or
    /// failing when services are required) without the `openssl` command.
    pub fn new(name: &str) -> Option<Self> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let ca = Self {
            dir,
            name: name.to_owned(),
        };
        let subject = format!("/CN={name}");
        if let Err(error) = ca.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            &subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]) {
            service_missing("the openssl command line", error);
            return None;
        }
        Some(ca)
    }

    /// The authority's certificate (PEM), what a client trusts.
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A certificate for `common_name`, signed by this authority, with the
    /// subject alternative names `sans` (`DNS:localhost`, `IP:127.0.0.1`;
    /// empty: none), for a server or a client; files named after `file`.
    pub fn issue(&self, file: &str, common_name: &str, sans: &[&str]) -> Issued {
        let key = format!("{file}.key");
        let csr = format!("{file}.csr");
        let cert = format!("{file}.crt");
        let extensions = format!("{file}.ext");
        let mut text = String::from("basicConstraints=CA:FALSE\n");
        if !sans.is_empty() {
            text.push_str(&format!("subjectAltName={}\n", sans.join(",")));
        }
        std::fs::write(self.dir.path().join(&extensions), text).expect("write extensions");
        let subject = format!("/CN={common_name}");
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subject,
        ])
        .unwrap_or_else(|error| panic!("{error}"));
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &extensions,
        ])
        .unwrap_or_else(|error| panic!("{error}"));
        Issued {
            cert: self.dir.path().join(cert),
            key: self.dir.path().join(key),
        }
    }

    /// `key` encrypted with `password` (PKCS#8, AES-256), in a new file.
    pub fn encrypt_key(&self, key: &Path, password: &str) -> PathBuf {
        let out = key.with_extension("encrypted.key");
        let passout = format!("pass:{password}");
        self.openssl(&[
            "pkcs8",
            "-topk8",
            "-v2",
            "aes-256-cbc",
            "-in",
            key.to_str().expect("a UTF-8 path"),
            "-out",
            out.to_str().expect("a UTF-8 path"),
            "-passout",
            &passout,
        ])
        .unwrap_or_else(|error| panic!("{error}"));
        out
    }

    fn openssl(&self, args: &[&str]) -> Result<(), String> {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .map_err(|error| format!("cannot run openssl: {error}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "openssl {} ({}) failed with {}: {}",
                args.join(" "),
                self.name,
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }
}
