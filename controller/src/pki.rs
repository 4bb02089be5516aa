//! The controller's PKI: its CA, server and admin certificates, and the signer for machine
//! certificates.
//!
//! The signer decides everything a machine certificate says: subject, SAN, key usage, EKU
//! (client-auth only), `CA:FALSE` and validity all come from the controller's own record. From a
//! CSR only the public key is used, after its self-signature is checked (what CVE-2022-36103 in
//! Talos teaches).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use muster_proto::model::MachineId;
use muster_proto::musterconfig::MusterConfig;
use muster_proto::pin::CaPin;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};

/// Organization of admin client certificates.
pub const ORG_ADMINS: &str = "muster:admins";
/// Organization of machine client certificates.
pub const ORG_MACHINES: &str = "muster:machines";
/// Organization of the controller's server certificate.
pub const ORG_CONTROLLERS: &str = "muster:controllers";

/// Default lifetime of a machine certificate.
pub const DEFAULT_MACHINE_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
const CA_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const LEAF_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Backdating of `notBefore`, for nodes whose clocks run a little behind.
const CLOCK_SLACK: Duration = Duration::from_secs(300);

/// The files of a controller data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("server.crt")
    }
    pub fn server_key(&self) -> PathBuf {
        self.root.join("server.key")
    }
    pub fn admin_cert(&self) -> PathBuf {
        self.root.join("admin.crt")
    }
    pub fn admin_key(&self) -> PathBuf {
        self.root.join("admin.key")
    }
    pub fn musterconfig(&self) -> PathBuf {
        self.root.join("musterconfig")
    }
    pub fn state_db(&self) -> PathBuf {
        self.root.join("state.db")
    }
    pub fn ports(&self) -> PathBuf {
        self.root.join("ports.json")
    }
    /// Whether a CA exists here already.
    pub fn has_ca(&self) -> bool {
        self.ca_cert().exists() || self.ca_key().exists()
    }
}

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

/// Why a CSR was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("csr_pem: not a valid, self-signed PKCS#10 request: {0}")]
    BadCsr(String),
    #[error("csr_pem: key algorithm not accepted (use ECDSA P-256/P-384 or Ed25519)")]
    KeyAlgorithm,
    #[error("signing failed: {0}")]
    Sign(String),
}

/// What `init` produced.
#[derive(Debug, Clone)]
pub struct InitOutcome {
    pub pin: CaPin,
    pub musterconfig: PathBuf,
}

fn random_serial(rng: &SystemRandom) -> Result<SerialNumber, PkiError> {
    let mut b = [0u8; 16];
    rng.fill(&mut b).map_err(|_| PkiError::Rng)?;
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // no leading zero byte
    Ok(SerialNumber::from_slice(&b))
}

fn dn(cn: &str, org: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::CommonName, cn);
    d.push(DnType::OrganizationName, org);
    d
}

/// Sets validity from `now` for `ttl`, backdated for clock skew by at most a tenth of the
/// lifetime, so the holder's "renew at 70 %" stays close to 70 % of the time it really has.
fn validity(params: &mut CertificateParams, now: SystemTime, ttl: Duration) {
    let slack = CLOCK_SLACK.min(ttl / 10);
    let start = now.checked_sub(slack).unwrap_or(now);
    params.not_before = start.into();
    params.not_after = (now + ttl).into();
}

fn san(s: &str) -> Result<SanType, PkiError> {
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

/// Creates the CA, server and admin certificates and the CLI's musterconfig in `dir`.
/// Refuses if a CA exists there already.
pub fn init(dir: &DataDir, extra_sans: &[String], endpoint: &str) -> Result<InitOutcome, PkiError> {
    if dir.has_ca() {
        return Err(PkiError::CaExists(dir.root().to_owned()));
    }
    let sans_checked: Vec<SanType> = extra_sans.iter().map(|s| san(s)).collect::<Result<_, _>>()?;
    muster_util::create_dir_private(dir.root()).map_err(|source| PkiError::Io {
        action: "create",
        path: dir.root().to_owned(),
        source,
    })?;
    let rng = SystemRandom::new();
    let now = SystemTime::now();

    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = dn("muster-ca", ORG_CONTROLLERS);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca_params.serial_number = Some(random_serial(&rng)?);
    validity(&mut ca_params, now, CA_TTL);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca_params, ca_key);

    // Server certificate.
    let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut sp = CertificateParams::default();
    sp.distinguished_name = dn("muster-controller", ORG_CONTROLLERS);
    let mut names = vec![san("localhost")?, san("127.0.0.1")?, san("::1")?];
    let host = local_hostname();
    if !host.is_empty() {
        if let Ok(s) = san(&host) {
            names.push(s);
        }
    }
    names.extend(sans_checked);
    names.dedup();
    sp.subject_alt_names = names;
    sp.is_ca = IsCa::ExplicitNoCa;
    sp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    sp.serial_number = Some(random_serial(&rng)?);
    sp.use_authority_key_identifier_extension = true;
    validity(&mut sp, now, LEAF_TTL);
    let server_cert = sp.signed_by(&server_key, &issuer)?;

    // Admin client certificate.
    let admin_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ap = CertificateParams::default();
    ap.distinguished_name = dn("admin", ORG_ADMINS);
    ap.is_ca = IsCa::ExplicitNoCa;
    ap.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    ap.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    ap.serial_number = Some(random_serial(&rng)?);
    ap.use_authority_key_identifier_extension = true;
    validity(&mut ap, now, LEAF_TTL);
    let admin_cert = ap.signed_by(&admin_key, &issuer)?;

    let write = |path: PathBuf, content: &str, mode: u32| {
        muster_util::write_atomic(&path, content.as_bytes(), mode).map_err(|source| PkiError::Io {
            action: "write",
            path,
            source,
        })
    };
    // The key first and the certificate last: has_ca() is true from the first write on.
    write(dir.ca_key(), &issuer.key().serialize_pem(), 0o600)?;
    write(dir.server_key(), &server_key.serialize_pem(), 0o600)?;
    write(dir.server_cert(), &server_cert.pem(), 0o644)?;
    write(dir.admin_key(), &admin_key.serialize_pem(), 0o600)?;
    write(dir.admin_cert(), &admin_cert.pem(), 0o644)?;
    let mc = MusterConfig::new(
        vec![endpoint.to_owned()],
        ca_pem.clone(),
        admin_cert.pem(),
        admin_key.serialize_pem(),
    );
    let yaml = mc.to_yaml().map_err(|e| PkiError::Invalid {
        what: "musterconfig",
        path: dir.musterconfig(),
        reason: e.to_string(),
    })?;
    write(dir.musterconfig(), &yaml, 0o600)?;
    write(dir.ca_cert(), &ca_pem, 0o644)?;

    let pin = CaPin::of_cert_der(ca_cert.der()).map_err(|e| PkiError::Invalid {
        what: "CA certificate",
        path: dir.ca_cert(),
        reason: e.to_string(),
    })?;
    Ok(InitOutcome { pin, musterconfig: dir.musterconfig() })
}

/// Rewrites the endpoints of the musterconfig in `dir` (after `serve` bound its real port).
pub fn set_musterconfig_endpoint(dir: &DataDir, endpoint: &str) -> Result<(), PkiError> {
    let path = dir.musterconfig();
    let text = read(&path)?;
    let mut mc = MusterConfig::from_yaml(&text).map_err(|e| PkiError::Invalid {
        what: "musterconfig",
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if mc.endpoints == [endpoint] {
        return Ok(());
    }
    mc.endpoints = vec![endpoint.to_owned()];
    let yaml = mc.to_yaml().map_err(|e| PkiError::Invalid {
        what: "musterconfig",
        path: path.clone(),
        reason: e.to_string(),
    })?;
    muster_util::write_atomic(&path, yaml.as_bytes(), 0o600).map_err(|source| PkiError::Io {
        action: "write",
        path,
        source,
    })
}

fn read(path: &Path) -> Result<String, PkiError> {
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
    issuer: Issuer<'static, KeyPair>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("pin", &self.pin).finish_non_exhaustive()
    }
}

fn pem_to_der(pem_text: &str, path: &Path, what: &'static str) -> Result<Vec<u8>, PkiError> {
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

    /// Signs a machine client certificate. Everything but the public key comes from `id`,
    /// `now` and `ttl`; whatever else the CSR asks for is ignored.
    pub fn sign_machine(
        &self,
        csr_pem: &str,
        id: &MachineId,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<IssuedCert, SignError> {
        if csr_pem.len() > 16 * 1024 {
            return Err(SignError::BadCsr("larger than 16 KiB".into()));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| SignError::BadCsr(e.to_string()))?;
        let alg = csr.public_key.algorithm();
        let accepted = [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519];
        if !accepted.contains(&alg) {
            return Err(SignError::KeyAlgorithm);
        }
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(id.as_str(), ORG_MACHINES);
        let uri = format!("urn:muster:machine:{id}");
        p.subject_alt_names =
            vec![SanType::URI(uri.try_into().map_err(|e: rcgen::Error| SignError::Sign(e.to_string()))?)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let serial = random_serial(&self.rng).map_err(|e| SignError::Sign(e.to_string()))?;
        let serial_hex = hex::encode(serial.to_bytes());
        p.serial_number = Some(serial);
        p.use_authority_key_identifier_extension = true;
        validity(&mut p, now, ttl);
        let cert = p.signed_by(&csr.public_key, &self.issuer).map_err(|e| SignError::Sign(e.to_string()))?;
        Ok(IssuedCert { pem: cert.pem(), serial_hex, not_after: now + ttl })
    }
}

/// A signed machine certificate.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    pub serial_hex: String,
    pub not_after: SystemTime,
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// Who is calling, as told by a client certificate the TLS layer verified against our CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin { name: String },
    Machine { id: MachineId, serial_hex: String, not_after_unix: i64 },
}

/// Why a verified certificate does not name a caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallerError {
    #[error("client certificate is not parseable: {0}")]
    Parse(String),
    #[error("client certificate has no Muster role (organization {0:?})")]
    UnknownRole(String),
    #[error("machine certificate has an invalid machine id")]
    BadMachineId,
}

/// Identifies the caller from its (already chain-verified) leaf certificate.
pub fn identify(leaf_der: &[u8]) -> Result<Caller, CallerError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf_der).map_err(|e| CallerError::Parse(e.to_string()))?;
    let subject = cert.subject();
    let org = subject.iter_organization().next().and_then(|a| a.as_str().ok()).unwrap_or_default();
    let cn = subject.iter_common_name().next().and_then(|a| a.as_str().ok()).unwrap_or_default();
    match org {
        ORG_ADMINS => Ok(Caller::Admin { name: cn.to_owned() }),
        ORG_MACHINES => Ok(Caller::Machine {
            id: cn.parse().map_err(|_| CallerError::BadMachineId)?,
            serial_hex: hex::encode(cert.raw_serial()),
            not_after_unix: cert.validity().not_after.timestamp(),
        }),
        other => Err(CallerError::UnknownRole(other.to_owned())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
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
        let lifetime = cert.validity().not_after.timestamp() - unix_ms(now) / 1000;
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
