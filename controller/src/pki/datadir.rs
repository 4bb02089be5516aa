//! The controller's data directory and its one-time initialisation: CA, server and admin
//! certificates, and the CLI's musterconfig.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use muster_machinery::musterconfig::MusterConfig;
use muster_machinery::pin::CaPin;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use ring::rand::SystemRandom;

use super::{
    dn, local_hostname, random_serial, san, validity, PkiError, CA_TTL, LEAF_TTL, ORG_ADMINS, ORG_CONTROLLERS,
};

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

/// What `init` produced.
#[derive(Debug, Clone)]
pub struct InitOutcome {
    pub pin: CaPin,
    pub musterconfig: PathBuf,
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
