//! The join secrets' hashes (`muster_machinery::k8s`) against the same values computed
//! independently by `sha256sum` and `openssl`, for a single CA and a chained one (an
//! intermediate signed by a root, both in the bundle).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use muster_machinery::k8s::{k3s_token, kubeadm_discovery_hash};

fn sh(script: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(script).output().expect("sh");
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn sha256sum(path: &Path) -> String {
    sh(&format!("sha256sum '{}'", path.display())).split_whitespace().next().unwrap().to_owned()
}

fn openssl_spki_hash(path: &Path) -> String {
    let out = sh(&format!(
        "openssl x509 -pubkey -noout -in '{}' | openssl pkey -pubin -outform der | sha256sum",
        path.display()
    ));
    format!("sha256:{}", out.split_whitespace().next().unwrap())
}

fn ca(name: &str) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p
}

#[test]
fn k3s_token_and_kubeadm_discovery_hash_match_sha256sum_and_openssl() {
    for tool in ["sha256sum", "openssl"] {
        assert!(
            Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().unwrap().status.success(),
            "{tool} is missing: apt-get install coreutils openssl"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let root_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let root = ca("k3s-server-ca").self_signed(&root_key).unwrap();
    let single = dir.path().join("server-ca.crt");
    std::fs::write(&single, root.pem()).unwrap();

    let inter_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let root_params = ca("k3s-server-ca");
    let issuer = rcgen::Issuer::from_params(&root_params, &root_key);
    let inter = ca("k3s-intermediate").signed_by(&inter_key, &issuer).unwrap();
    let chained = dir.path().join("chained.crt");
    std::fs::write(&chained, format!("{}{}", inter.pem(), root.pem())).unwrap();
    let first = dir.path().join("first.crt");
    std::fs::write(&first, inter.pem()).unwrap();

    for (bundle, first_cert) in [(&single, &single), (&chained, &first)] {
        let text = std::fs::read_to_string(bundle).unwrap();
        assert_eq!(k3s_token(&text, "server", "pw"), format!("K10{}::server:pw", sha256sum(bundle)));
        assert_eq!(kubeadm_discovery_hash(&text).unwrap(), openssl_spki_hash(first_cert));
    }
    // The discovery hash is exactly Muster's CA pin of the same certificate.
    let text = std::fs::read_to_string(&single).unwrap();
    assert_eq!(
        kubeadm_discovery_hash(&text).unwrap(),
        muster_machinery::pin::CaPin::of_cert_pem(&text).unwrap().to_string()
    );
}
