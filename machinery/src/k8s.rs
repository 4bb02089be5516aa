//! How Kubernetes distributions name the secrets a joining node presents, computed here so the
//! controller never needs a secret back from a node (issue #15 builds on these):
//!
//! - k3s's full token, `K10<sha256 of the CA bundle>::<user>:<password>`: the hash is over the
//!   bytes of the server CA bundle exactly as `/cacerts` serves them (a chained CA's whole file),
//!   which a joining k3s checks before it trusts the server.
//! - kubeadm's `--discovery-token-ca-cert-hash`, `sha256:<hex>` over the CA certificate's
//!   SubjectPublicKeyInfo: the same construction as Muster's own CA pin.

use ring::digest;

use crate::pin::{CaPin, PinError};

/// k3s's secure token for `ca_bundle_pem` (the server CA file's bytes) and a user's password
/// (`server` for the server token, `node` for the agent token).
pub fn k3s_token(ca_bundle_pem: &str, user: &str, password: &str) -> String {
    let hash = hex::encode(digest::digest(&digest::SHA256, ca_bundle_pem.as_bytes()));
    format!("K10{hash}::{user}:{password}")
}

/// kubeadm's discovery hash of a CA certificate (the first in `ca_pem`).
pub fn kubeadm_discovery_hash(ca_pem: &str) -> Result<String, PinError> {
    Ok(CaPin::of_cert_pem(ca_pem)?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_k3s_token_hashes_the_bundle_bytes_as_given() {
        // sha256("abc"), a published test vector: the bytes are hashed as they are.
        assert_eq!(
            k3s_token("abc", "server", "s3cret"),
            "K10ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad::server:s3cret"
        );
    }
}
