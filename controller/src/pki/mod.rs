//! The controller's PKI: its CA, server and admin certificates ([`datadir`]: created once by
//! `init`), the signer for machine certificates ([`signer`]), and who a verified client
//! certificate names ([`auth`]).
//!
//! The signer decides everything a machine certificate says: subject, SAN, key usage, EKU
//! (client-auth only), `CA:FALSE` and validity all come from the controller's own record. From a
//! CSR only the public key is used, after its self-signature is checked (what CVE-2022-36103 in
//! Talos teaches).

mod auth;
mod datadir;
mod signer;

pub use auth::{identify, Caller, CallerError};
pub use datadir::{init, DataDir, InitOutcome};
pub use signer::{Csr, IssuedCert, SignError};

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use muster_machinery::pin::CaPin;
use rcgen::{CertificateParams, DistinguishedName, DnType, Issuer, KeyPair, SanType, SerialNumber};
use ring::rand::{SecureRandom, SystemRandom};

/// Organization of admin client certificates.
pub const ORG_ADMINS: &str = "muster:admins";
/// Organization of machine client certificates.
pub const ORG_MACHINES: &str = "muster:machines";
/// Organization of the controller's server certificate.
pub const ORG_CONTROLLERS: &str = "muster:controllers";

/// Default lifetime of a machine certificate.
pub const DEFAULT_MACHINE_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
pub(crate) const CA_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
pub(crate) const LEAF_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Backdating of `notBefore`, for nodes whose clocks run a little behind.
const CLOCK_SLACK: Duration = Duration::from_secs(300);

/// Errors of the PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("a CA already exists in {0}; refusing to overwrite it (use another --data-dir, or remove the directory to start over)")]
    CaExists(PathBuf),
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("invalid {what} in {path}: {reason}")]
    Invalid { what: &'static str, path: PathBuf, reason: String },
    #[error("--san {0:?} is neither an IP address nor a DNS name")]
    BadSan(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("no randomness available")]
    Rng,
}

pub(crate) fn random_serial(rng: &SystemRandom) -> Result<SerialNumber, PkiError> {
    let mut b = [0u8; 16];
    rng.fill(&mut b).map_err(|_| PkiError::Rng)?;
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // no leading zero byte
    Ok(SerialNumber::from_slice(&b))
}

pub(crate) fn dn(cn: &str, org: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::CommonName, cn);
    d.push(DnType::OrganizationName, org);
    d
}

/// Sets validity from `now` for `ttl`, backdated for clock skew by at most a tenth of the
/// lifetime, so the holder's "renew at 70 %" stays close to 70 % of the time it really has.
pub(crate) fn validity(params: &mut CertificateParams, now: SystemTime, ttl: Duration) {
    let slack = CLOCK_SLACK.min(ttl / 10);
    let start = now.checked_sub(slack).unwrap_or(now);
    params.not_before = start.into();
    params.not_after = (now + ttl).into();
}

pub(crate) fn san(s: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !ok {
        return Err(PkiError::BadSan(s.to_owned()));
    }
    Ok(SanType::DnsName(s.try_into().map_err(|_| PkiError::BadSan(s.to_owned()))?))
}

/// This host's name, for the server certificate. Empty if unknown.
pub fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_default()
}

pub(crate) fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

/// The controller's loaded key material.
pub struct Pki {
    /// CA certificate, PEM.
    pub ca_pem: String,
    /// CA certificate, DER.
    pub ca_der: Vec<u8>,
    /// Server certificate chain (leaf, CA), DER.
    pub server_chain_der: Vec<Vec<u8>>,
    /// Server private key, PKCS#8 DER.
    pub server_key_der: Vec<u8>,
    pub pin: CaPin,
    pub(crate) issuer: Issuer<'static, KeyPair>,
    pub(crate) rng: SystemRandom,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("pin", &self.pin).finish_non_exhaustive()
    }
}

pub(crate) fn pem_to_der(pem_text: &str, path: &Path, what: &'static str) -> Result<Vec<u8>, PkiError> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes()).map_err(|e| PkiError::Invalid {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(p.contents)
}

impl Pki {
    /// Loads the CA and server material from a data directory made by [`init`].
    pub fn load(dir: &DataDir) -> Result<Self, PkiError> {
        let ca_pem = read(&dir.ca_cert())?;
        let ca_der = pem_to_der(&ca_pem, &dir.ca_cert(), "CA certificate")?;
        let ca_key = KeyPair::from_pem(&read(&dir.ca_key())?).map_err(|e| PkiError::Invalid {
            what: "CA key",
            path: dir.ca_key(),
            reason: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_der(&ca_der.clone().into(), ca_key).map_err(|e| {
            PkiError::Invalid { what: "CA certificate", path: dir.ca_cert(), reason: e.to_string() }
        })?;
        let server_pem = read(&dir.server_cert())?;
        let server_der = pem_to_der(&server_pem, &dir.server_cert(), "server certificate")?;
        let server_key = KeyPair::from_pem(&read(&dir.server_key())?).map_err(|e| PkiError::Invalid {
            what: "server key",
            path: dir.server_key(),
            reason: e.to_string(),
        })?;
        let pin = CaPin::of_cert_der(&ca_der).map_err(|e| PkiError::Invalid {
            what: "CA certificate",
            path: dir.ca_cert(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            ca_pem,
            server_chain_der: vec![server_der, ca_der.clone()],
            ca_der,
            server_key_der: server_key.serialize_der(),
            pin,
            issuer,
            rng: SystemRandom::new(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use muster_machinery::model::MachineId;
    use muster_machinery::musterconfig::MusterConfig;
    use rcgen::{
        BasicConstraints, CertificateSigningRequestParams, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    };
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    fn setup() -> (tempfile::TempDir, DataDir, Pki) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path().join("data"));
        init(&dir, &["10.0.2.2".into(), "ctl.example".into()], "https://127.0.0.1:7443").unwrap();
        let pki = Pki::load(&dir).unwrap();
        (tmp, dir, pki)
    }

    #[test]
    fn init_refuses_to_overwrite_and_writes_private_files() {
        use std::os::unix::fs::PermissionsExt;
        let (_tmp, dir, pki) = setup();
        let err = init(&dir, &[], "https://127.0.0.1:7443").unwrap_err();
        assert!(matches!(err, PkiError::CaExists(_)), "{err}");
        for p in [dir.ca_key(), dir.server_key(), dir.admin_key(), dir.musterconfig()] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        assert_eq!(CaPin::of_cert_pem(&pki.ca_pem).unwrap(), pki.pin);
        let mc = MusterConfig::from_yaml(&std::fs::read_to_string(dir.musterconfig()).unwrap()).unwrap();
        assert_eq!(
            identify(&pem_to_der(&mc.cert, Path::new("x"), "x").unwrap()).unwrap(),
            Caller::Admin { name: "admin".into() }
        );
    }

    #[test]
    fn bad_san_is_refused_before_anything_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path().join("d"));
        assert!(matches!(init(&dir, &["bad name!".into()], "https://x:1"), Err(PkiError::BadSan(_))));
        assert!(!dir.has_ca());
    }

    #[test]
    fn server_cert_has_requested_sans() {
        let (_tmp, _dir, pki) = setup();
        let (_, cert) = x509_parser::parse_x509_certificate(&pki.server_chain_der[0]).unwrap();
        let sans = cert.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
        let text: Vec<String> = sans.iter().map(|g| format!("{g:?}")).collect();
        for want in ["localhost", "ctl.example"] {
            assert!(
                sans.iter().any(|g| matches!(g, GeneralName::DNSName(d) if *d == want)),
                "{want}: {text:?}"
            );
        }
        assert!(
            sans.iter().any(|g| matches!(g, GeneralName::IPAddress(ip) if *ip == [10, 0, 2, 2])),
            "{text:?}"
        );
        assert!(
            sans.iter().any(|g| matches!(g, GeneralName::IPAddress(ip) if *ip == [127, 0, 0, 1])),
            "{text:?}"
        );
    }

    /// A CSR asking to be a CA, for extra SANs, server auth and a long life gets none of it.
    #[test]
    fn signing_ignores_everything_in_the_csr_but_the_key() {
        let (_tmp, _dir, pki) = setup();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p =
            CertificateParams::new(vec!["evil.example".to_string(), "localhost".to_string()]).unwrap();
        p.distinguished_name = dn("admin", ORG_ADMINS);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        p.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        let id: MachineId = "0123456789abcdef".parse().unwrap();
        let now = SystemTime::now();
        let issued = pki.sign_machine(&csr, &id, now, DEFAULT_MACHINE_CERT_TTL).unwrap();

        let der = pem_to_der(&issued.pem, Path::new("x"), "x").unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        // Our key, our subject.
        let csr_key = CertificateSigningRequestParams::from_pem(&csr).unwrap().public_key;
        assert_eq!(&*cert.public_key().subject_public_key.data, rcgen::PublicKeyData::der_bytes(&csr_key));
        assert_eq!(
            identify(&der).unwrap(),
            Caller::Machine {
                id: id.clone(),
                serial_hex: issued.serial_hex.clone(),
                not_after_unix: cert.validity().not_after.timestamp(),
            }
        );
        let mut saw_eku = false;
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::BasicConstraints(bc) => assert!(!bc.ca, "must not be a CA"),
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    saw_eku = true;
                    assert!(eku.client_auth && !eku.server_auth && !eku.any);
                }
                ParsedExtension::KeyUsage(ku) => assert!(!ku.key_cert_sign()),
                ParsedExtension::SubjectAlternativeName(san) => {
                    assert_eq!(san.general_names.len(), 1);
                    assert!(
                        matches!(&san.general_names[0], GeneralName::URI(u) if *u == format!("urn:muster:machine:{id}"))
                    );
                }
                _ => {}
            }
        }
        assert!(saw_eku);
        let lifetime = cert.validity().not_after.timestamp() - muster_util::unix_ms(now) / 1000;
        assert!((86_399..=86_401).contains(&lifetime), "{lifetime}");
    }

    #[test]
    fn garbage_and_tampered_csrs_are_refused() {
        let (_tmp, _dir, pki) = setup();
        let id: MachineId = "0123456789abcdef".parse().unwrap();
        let now = SystemTime::now();
        assert!(matches!(
            pki.sign_machine("garbage", &id, now, DEFAULT_MACHINE_CERT_TTL),
            Err(SignError::BadCsr(_))
        ));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = CertificateParams::new(vec![]).unwrap().serialize_request(&key).unwrap();
        let mut der = csr.der().to_vec();
        let n = der.len();
        der[n - 5] ^= 0x55; // break the signature
        let tampered = pem_encode("CERTIFICATE REQUEST", &der);
        assert!(matches!(
            pki.sign_machine(&tampered, &id, now, DEFAULT_MACHINE_CERT_TTL),
            Err(SignError::BadCsr(_))
        ));
    }

    fn pem_encode(label: &str, der: &[u8]) -> String {
        use std::fmt::Write;
        const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in der.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        let mut s = format!("-----BEGIN {label}-----\n");
        for line in out.as_bytes().chunks(64) {
            let _ = writeln!(s, "{}", String::from_utf8_lossy(line));
        }
        let _ = writeln!(s, "-----END {label}-----");
        s
    }
}
