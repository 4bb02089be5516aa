//! The CA pin: `sha256:<64 hex>` over the CA certificate's SubjectPublicKeyInfo (DER), the same
//! construction as kubeadm's `--discovery-token-ca-cert-hash`.

use std::fmt;
use std::str::FromStr;

use ring::digest;

/// Why a pin could not be parsed or computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    #[error("CA pin must be sha256:<64 hex digits>")]
    Format,
    #[error("not a valid X.509 certificate: {0}")]
    Certificate(String),
}

/// A parsed CA pin.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaPin([u8; 32]);

impl CaPin {
    /// The pin of a DER-encoded certificate.
    pub fn of_cert_der(der: &[u8]) -> Result<Self, PinError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| PinError::Certificate(e.to_string()))?;
        Ok(Self::of_spki_der(cert.tbs_certificate.subject_pki.raw))
    }

    /// The pin of the first certificate in a PEM bundle.
    pub fn of_cert_pem(pem: &str) -> Result<Self, PinError> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .map_err(|e| PinError::Certificate(e.to_string()))?;
        Self::of_cert_der(&p.contents)
    }

    /// The pin of a DER SubjectPublicKeyInfo.
    pub fn of_spki_der(spki: &[u8]) -> Self {
        let d = digest::digest(&digest::SHA256, spki);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }
}

impl FromStr for CaPin {
    type Err = PinError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hexpart = s.trim().strip_prefix("sha256:").ok_or(PinError::Format)?;
        if hexpart.len() != 64 {
            return Err(PinError::Format);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hexpart.to_ascii_lowercase(), &mut out).map_err(|_| PinError::Format)?;
        Ok(Self(out))
    }
}

impl fmt::Display for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let s = format!("sha256:{}", "ab".repeat(32));
        let p: CaPin = s.parse().unwrap();
        assert_eq!(p.to_string(), s);
        let upper: CaPin = format!("sha256:{}", "AB".repeat(32)).parse().unwrap();
        assert_eq!(upper, p);
    }

    #[test]
    fn rejects_bad_pins() {
        for bad in [
            "",
            "sha256:",
            "md5:abcd",
            &format!("sha256:{}", "zz".repeat(32)),
            &format!("sha256:{}", "ab".repeat(31)),
        ] {
            assert_eq!(bad.parse::<CaPin>(), Err(PinError::Format), "{bad}");
        }
    }

    #[test]
    fn debug_is_the_pin_itself() {
        let s = format!("sha256:{}", "0f".repeat(32));
        let p: CaPin = s.parse().unwrap();
        assert_eq!(format!("{p:?}"), s);
    }

    #[test]
    fn garbage_certificate_is_an_error() {
        assert!(matches!(CaPin::of_cert_der(b"nope"), Err(PinError::Certificate(_))));
        assert!(matches!(CaPin::of_cert_pem("nope"), Err(PinError::Certificate(_))));
    }
}
