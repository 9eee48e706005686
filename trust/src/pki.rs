//! The fabric's own certificate authority: making it, and issuing the
//! certificates that carry identities (`fabricctl pki init` and
//! `fabricctl pki issue`, and the embedded fabric's ephemeral CA).
//!
//! A CA directory holds `ca.pem` (the certificate every server and client
//! trusts) and `ca.key` (mode 0600: whoever reads it can mint any identity).
//! An issued certificate is written as `ROLE-NAME.pem` and `ROLE-NAME.key`
//! (0600). Keys are ECDSA P-256. This module never reads a certificate to
//! decide anything; it only makes them.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use crate::identity::{Identity, Role};

/// The CA certificate's file name in a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA key's file name in a CA directory (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// How long a CA is valid by default: ten years.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long an issued certificate is valid by default: one year.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why a CA could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `pki init` would overwrite an existing CA.
    #[error(
        "{0} exists already: a new CA would make every certificate issued so far useless (remove it first if that is what you want)"
    )]
    Exists(PathBuf),
    /// Certificate generation or parsing failed.
    #[error("{what}: {source}")]
    Certificate {
        /// What was being done.
        what: String,
        /// rcgen's reason.
        source: rcgen::Error,
    },
    /// A validity period that cannot be expressed.
    #[error("bad validity period: {0}")]
    Validity(String),
}

fn certificate_error(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let what = what.into();
    move |source| PkiError::Certificate { what, source }
}

/// A CA that can issue certificates.
pub struct CertificateAuthority {
    certificate_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct Issued {
    /// The certificate.
    pub certificate_pem: String,
    /// The private key (PKCS#8): a secret.
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("certificate_pem", &self.certificate_pem)
            .field("key_pem", &"<secret>")
            .finish()
    }
}

/// What else an issued certificate says.
#[derive(Clone, Debug)]
pub struct IssueOptions {
    /// Valid from.
    pub not_before: SystemTime,
    /// Valid until.
    pub not_after: SystemTime,
    /// DNS names for tools that check host names (grpcurl); fabric peers
    /// check the identity instead.
    pub dns_names: Vec<String>,
    /// IP addresses, likewise.
    pub ip_addresses: Vec<IpAddr>,
}

impl IssueOptions {
    /// Valid from a minute ago (clock skew) for `valid_for`.
    pub fn valid_for(valid_for: Duration) -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now - Duration::from_secs(60),
            not_after: now + valid_for,
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
        }
    }
}

impl Default for IssueOptions {
    fn default() -> Self {
        Self::valid_for(DEFAULT_VALIDITY)
    }
}

fn offset(time: SystemTime) -> Result<time::OffsetDateTime, PkiError> {
    let seconds = match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
    };
    time::OffsetDateTime::from_unix_timestamp(seconds)
        .map_err(|err| PkiError::Validity(err.to_string()))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive integer, as RFC 5280 asks.
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn ca_params(
    name: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, name);
    subject.push(DnType::OrganizationName, "fabric");
    params.distinguished_name = subject;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = offset(not_before)?;
    params.not_after = offset(not_after)?;
    params.serial_number = Some(random_serial());
    Ok(params)
}

impl CertificateAuthority {
    /// A new CA named `name` (and a random suffix), valid for `valid_for`; returns it and its
    /// key, PEM-encoded (keep it secret).
    pub fn generate(name: &str, valid_for: Duration) -> Result<(Self, String), PkiError> {
        let key = KeyPair::generate().map_err(certificate_error("generating the CA key"))?;
        let now = SystemTime::now();
        // A name of its own, so a certificate of another fabric's CA is
        // "unknown issuer", not a signature that fails to verify.
        let name = format!("{name} {}", hex::encode(rand::random::<[u8; 4]>()));
        let params = ca_params(&name, now - Duration::from_secs(60), now + valid_for)?;
        let certificate = params
            .self_signed(&key)
            .map_err(certificate_error("signing the CA certificate"))?;
        let key_pem = key.serialize_pem();
        Ok((
            Self {
                certificate_pem: certificate.pem(),
                issuer: Issuer::new(params, key),
            },
            key_pem,
        ))
    }

    /// A CA from its certificate and key.
    pub fn from_pem(certificate_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(certificate_error("reading the CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(certificate_pem, key)
            .map_err(certificate_error("reading the CA certificate"))?;
        Ok(Self {
            certificate_pem: certificate_pem.to_owned(),
            issuer,
        })
    }

    /// The CA certificate every fabric server and client trusts.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// A certificate for `identity`, with a fresh key.
    pub fn issue(&self, identity: &Identity, options: &IssueOptions) -> Result<Issued, PkiError> {
        let key = KeyPair::generate().map_err(certificate_error("generating a key"))?;
        let mut params = CertificateParams::default();
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, identity.to_string());
        subject.push(DnType::OrganizationName, "fabric");
        params.distinguished_name = subject;
        let uri = identity
            .uri()
            .try_into()
            .map_err(|err: rcgen::Error| PkiError::Certificate {
                what: format!("the identity URI of {identity}"),
                source: err,
            })?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        for name in &options.dns_names {
            let dns = name.clone().try_into().map_err(certificate_error(format!(
                "DNS name {:?}",
                crate::identity::shorten(name)
            )))?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        for address in &options.ip_addresses {
            params.subject_alt_names.push(SanType::IpAddress(*address));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match identity.role {
            // Servers as well as clients: they serve and they dial.
            Role::Node | Role::Coordinator => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Role::Operator | Role::Monitor | Role::Client => {
                vec![ExtendedKeyUsagePurpose::ClientAuth]
            }
        };
        params.not_before = offset(options.not_before)?;
        params.not_after = offset(options.not_after)?;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let certificate = params
            .signed_by(&key, &self.issuer)
            .map_err(certificate_error(format!(
                "signing the certificate of {identity}"
            )))?;
        Ok(Issued {
            certificate_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Write `contents` to `path` with `mode`, replacing it atomically (a
/// temporary file in the same directory, then a rename); with `exclusive`,
/// refuse to replace an existing file.
pub fn write_file(path: &Path, contents: &str, mode: u32, exclusive: bool) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    if exclusive && path.exists() {
        return Err(PkiError::Exists(path.to_owned()));
    }
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = path.with_file_name(format!(".{file_name}.{:08x}.tmp", rand::random::<u32>()));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .map_err(io)?;
    let written = file
        .write_all(contents.as_bytes())
        .and_then(|()| file.sync_all());
    drop(file);
    let renamed = written.and_then(|()| {
        if exclusive {
            // Fails if another writer made it meanwhile.
            std::fs::hard_link(&temporary, path).and_then(|()| std::fs::remove_file(&temporary))
        } else {
            std::fs::rename(&temporary, path)
        }
    });
    if let Err(err) = renamed {
        let _ = std::fs::remove_file(&temporary);
        if err.kind() == std::io::ErrorKind::AlreadyExists {
            return Err(PkiError::Exists(path.to_owned()));
        }
        return Err(io(err));
    }
    Ok(())
}

/// Make a CA in `dir` (created if needed): `ca.pem` and `ca.key` (0600).
/// Refuses to replace an existing CA.
pub fn init(dir: &Path, name: &str, valid_for: Duration) -> Result<CertificateAuthority, PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let key_path = dir.join(CA_KEY_FILE);
    if key_path.exists() {
        return Err(PkiError::Exists(key_path));
    }
    let (authority, key_pem) = CertificateAuthority::generate(name, valid_for)?;
    write_file(&key_path, &key_pem, 0o600, true)?;
    write_file(
        &dir.join(CA_CERT_FILE),
        authority.certificate_pem(),
        0o644,
        false,
    )?;
    Ok(authority)
}

/// The CA in `dir`.
pub fn load(dir: &Path) -> Result<CertificateAuthority, PkiError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| PkiError::Io { path, source })
    };
    CertificateAuthority::from_pem(&read(CA_CERT_FILE)?, &read(CA_KEY_FILE)?)
}

/// Where [`write_issued`] puts the certificate and key of `identity`.
pub fn issued_paths(dir: &Path, identity: &Identity) -> (PathBuf, PathBuf) {
    let stem = format!("{}-{}", identity.role, identity.name);
    (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    )
}

/// Write an issued certificate (0644) and its key (0600) into `dir`,
/// replacing an earlier pair for the same identity (a rotation).
pub fn write_issued(
    dir: &Path,
    identity: &Identity,
    issued: &Issued,
) -> Result<(PathBuf, PathBuf), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let (certificate, key) = issued_paths(dir, identity);
    write_file(&key, &issued.key_pem, 0o600, false)?;
    write_file(&certificate, &issued.certificate_pem, 0o644, false)?;
    Ok((certificate, key))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_ca_issues_certificates_that_carry_their_identity_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let authority = init(dir.path(), "test CA", CA_VALIDITY).unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join(CA_KEY_FILE)), 0o600);
        assert!(matches!(
            init(dir.path(), "again", CA_VALIDITY),
            Err(PkiError::Exists(_))
        ));

        let identity = Identity::new(Role::Node, "n1").unwrap();
        let issued = authority
            .issue(&identity, &IssueOptions::default())
            .unwrap();
        let (certificate, key) = write_issued(dir.path(), &identity, &issued).unwrap();
        assert_eq!(mode(&key), 0o600);
        let der = rustls_pki_types::pem::PemObject::from_pem_file(&certificate);
        let der: rustls_pki_types::CertificateDer<'static> = der.unwrap();
        assert_eq!(Identity::from_certificate(&der).unwrap(), identity);

        // The CA read back from disk issues certificates too.
        let reloaded = load(dir.path()).unwrap();
        let client = Identity::new(Role::Client, "web1").unwrap();
        reloaded.issue(&client, &IssueOptions::default()).unwrap();
    }
}

/// A CA directory in use: the embedded fabric's and the tests'.
#[derive(Debug)]
pub struct PkiDir {
    dir: PathBuf,
    authority: CertificateAuthority,
}

impl PkiDir {
    /// The CA in `dir`, made there first if there is none. Several
    /// processes may race to make it: the CA is made whole in a temporary
    /// folder beside `dir` and renamed into place, so each ends up with
    /// the same complete CA.
    pub fn open_or_init(dir: &Path, name: &str) -> Result<Self, PkiError> {
        if !dir.join(CA_KEY_FILE).exists() {
            let parent = dir.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(parent).map_err(|source| PkiError::Io {
                path: parent.to_owned(),
                source,
            })?;
            let staging = parent.join(format!(
                ".{}.{:08x}.tmp",
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                rand::random::<u32>()
            ));
            init(&staging, name, CA_VALIDITY)?;
            if std::fs::rename(&staging, dir).is_err() {
                // Someone else's CA won the race (or `dir` exists): use it.
                let _ = std::fs::remove_dir_all(&staging);
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            authority: load(dir)?,
        })
    }

    /// The CA's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate's file (`tls_ca`).
    pub fn ca_certificate(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }

    /// The CA.
    pub fn authority(&self) -> &CertificateAuthority {
        &self.authority
    }

    /// Issue a certificate for `role/name` (valid for a year) into `out`;
    /// returns (certificate, key) files.
    pub fn issue_into(
        &self,
        role: Role,
        name: &str,
        out: &Path,
    ) -> Result<(PathBuf, PathBuf), PkiError> {
        let identity =
            Identity::new(role, name).map_err(|err| PkiError::Validity(err.to_string()))?;
        let issued = self.authority.issue(&identity, &IssueOptions::default())?;
        write_issued(out, &identity, &issued)
    }
}
