//! The PXE bundle is reproducible: the same inputs give the same bytes, in a fresh directory,
//! and the manifest describes the files. Downloads Debian's kernel package once (apt-get
//! download, into a cache kept under the target dir); never installs anything.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use muster_images::{build_pxe, Manifest, PxeOptions, Quiet, INITRD, KERNEL, MANIFEST};

fn sha256(p: &std::path::Path) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, &std::fs::read(p).unwrap()))
}

#[test]
fn same_inputs_same_bytes_and_the_manifest_matches() {
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("muster-image-cache");
    let tmp = tempfile::tempdir().unwrap();
    // Any dynamically linked program stands in for the agent: the builder copies it with its
    // libraries, strips it and bakes it in.
    let opts = |out: &str| PxeOptions {
        out: tmp.path().join(out),
        agent: PathBuf::from("/bin/true"),
        cache: cache.clone(),
        kernel_package: None,
        busybox: PathBuf::from("/bin/busybox"),
    };
    let a = build_pxe(&opts("a"), &mut Quiet).unwrap();
    let b = build_pxe(&opts("b"), &mut Quiet).unwrap();
    assert_eq!(a, b);
    for f in [KERNEL, INITRD, MANIFEST, "SHA256SUMS"] {
        assert_eq!(sha256(&tmp.path().join("a").join(f)), sha256(&tmp.path().join("b").join(f)), "{f}");
    }
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(tmp.path().join("a").join(MANIFEST)).unwrap()).unwrap();
    for f in &m.files {
        let p = tmp.path().join("a").join(&f.name);
        assert_eq!(
            (std::fs::metadata(&p).unwrap().len(), sha256(&p)),
            (f.size, f.sha256.clone()),
            "{}",
            f.name
        );
    }
    assert!(m.kernel_version.ends_with("-amd64"), "{}", m.kernel_version);
    // The initramfs is small (the goal: 10 MB).
    let initrd = m.files.iter().find(|f| f.name == INITRD).unwrap();
    assert!(initrd.size < 10_000_000, "{}", initrd.size);
    // Built again into the same place with the same inputs: kept as is.
    let again = build_pxe(&opts("a"), &mut Quiet).unwrap();
    assert_eq!(again, a);
}
