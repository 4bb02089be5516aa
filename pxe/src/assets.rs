//! Boot assets (kernel, initramfs, …) served from one directory, with SHA-256 checksums.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use ring::digest;

/// The generated checksum list's name (`/boot/assets/SHA256SUMS`).
pub const SHA256SUMS: &str = "SHA256SUMS";

/// Files directly in one directory. Names are plain file names: ASCII letters, digits, `.`, `-`,
/// `_`, not starting with `.`; a symlink is served only if it resolves to a regular file
/// directly in the same directory.
#[derive(Debug)]
pub struct Assets {
    dir: PathBuf,
    /// SHA-256 by name, valid while (inode, size, mtime) is unchanged.
    sums: Mutex<HashMap<String, Cached>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Cached {
    ino: u64,
    len: u64,
    mtime: SystemTime,
    sha256: [u8; 32],
}

/// An asset opened for serving: the open file, its length and checksum.
#[derive(Debug)]
pub struct AssetFile {
    pub file: tokio::fs::File,
    pub len: u64,
    pub sha256: [u8; 32],
}

impl AssetFile {
    /// The checksum as lower-case hex.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("{0:?} is not a valid asset name")]
    InvalidName(String),
    #[error("no asset {0:?}")]
    NotFound(String),
    #[error("asset {name:?}: {source}")]
    Io { name: String, source: std::io::Error },
}

impl Assets {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), sums: Mutex::new(HashMap::new()) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether `name` may be served at all.
    pub fn valid_name(name: &str) -> bool {
        !name.is_empty()
            && !name.starts_with('.')
            && name.len() <= 128
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    }

    /// The real path of `name`, if it is a regular file directly in the directory.
    async fn resolve(&self, name: &str) -> Result<PathBuf, AssetError> {
        if !Self::valid_name(name) {
            return Err(AssetError::InvalidName(name.to_owned()));
        }
        let io = |source: std::io::Error| AssetError::Io { name: name.to_owned(), source };
        let dir = tokio::fs::canonicalize(&self.dir).await.map_err(io)?;
        let path = match tokio::fs::canonicalize(dir.join(name)).await {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(AssetError::NotFound(name.to_owned()))
            }
            Err(e) => return Err(io(e)),
        };
        if path.parent() != Some(dir.as_path()) {
            tracing::warn!(asset = name, target = %path.display(), "asset resolves outside the assets directory");
            return Err(AssetError::NotFound(name.to_owned()));
        }
        Ok(path)
    }

    /// Opens `name` for serving, with its checksum (computed once per file version).
    pub async fn open(&self, name: &str) -> Result<AssetFile, AssetError> {
        let path = self.resolve(name).await?;
        let io = |source: std::io::Error| AssetError::Io { name: name.to_owned(), source };
        let file = tokio::fs::File::open(&path).await.map_err(io)?;
        let meta = file.metadata().await.map_err(io)?;
        if !meta.is_file() {
            return Err(AssetError::NotFound(name.to_owned()));
        }
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let key = |sha256| Cached { ino: meta.ino(), len: meta.len(), mtime, sha256 };
        let cached = self
            .sums
            .lock()
            .ok()
            .and_then(|s| s.get(name).filter(|c| **c == key(c.sha256)).map(|c| c.sha256));
        let sha256 = match cached {
            Some(h) => h,
            None => {
                // Hash through a second handle of the same open file (it shares the offset).
                let std_file = file.try_clone().await.map_err(io)?.into_std().await;
                let h = tokio::task::spawn_blocking(move || hash_file(std_file))
                    .await
                    .map_err(|e| io(std::io::Error::other(e)))?
                    .map_err(io)?;
                if let Ok(mut s) = self.sums.lock() {
                    s.insert(name.to_owned(), key(h));
                }
                h
            }
        };
        // The clone shares the file offset: start from the beginning again.
        let mut file = file;
        use tokio::io::AsyncSeekExt;
        file.seek(std::io::SeekFrom::Start(0)).await.map_err(io)?;
        Ok(AssetFile { file, len: meta.len(), sha256 })
    }

    /// `sha256sum` lines (`<hex>  <name>`) for every servable file, sorted by name.
    pub async fn sha256sums(&self) -> Result<String, AssetError> {
        let io = |source: std::io::Error| AssetError::Io { name: SHA256SUMS.to_owned(), source };
        let mut names = Vec::new();
        let mut rd = tokio::fs::read_dir(&self.dir).await.map_err(io)?;
        while let Some(e) = rd.next_entry().await.map_err(io)? {
            if let Some(n) = e.file_name().to_str() {
                if Self::valid_name(n) && n != SHA256SUMS {
                    names.push(n.to_owned());
                }
            }
        }
        names.sort();
        let mut out = String::new();
        for n in names {
            match self.open(&n).await {
                Ok(a) => out.push_str(&format!("{}  {n}\n", a.sha256_hex())),
                Err(AssetError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

fn hash_file(mut f: std::fs::File) -> std::io::Result<[u8; 32]> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

/// What a `Range` header asks of a `len`-byte body (RFC 9110, section 14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// Serve the whole body (`200`): the header is malformed, uses another unit or asks for
    /// several ranges — RFC 9110 lets a server ignore all of these, and a malformed one must not
    /// turn a download into an error.
    Full,
    /// Serve bytes `first..=last` (`206`); a last position past the end is clamped to it.
    Partial { first: u64, last: u64 },
    /// Valid, but no byte of it exists (`416`): a first position at or past the end, or a
    /// suffix of length 0.
    Unsatisfiable,
}

/// Interprets one `Range` header for a `len`-byte body.
pub fn parse_range(header: &str, len: u64) -> RangeRequest {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeRequest::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    // A position is 1*DIGIT; one too large for u64 is still a (huge) position.
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())).then(|| s.parse().unwrap_or(u64::MAX))
    };
    match (a.is_empty(), b.is_empty()) {
        (true, true) => RangeRequest::Full,
        // bytes=-N: the last N bytes (all of them if the body is shorter).
        (true, false) => match num(b) {
            None => RangeRequest::Full,
            Some(0) => RangeRequest::Unsatisfiable,
            Some(_) if len == 0 => RangeRequest::Full,
            Some(n) => RangeRequest::Partial { first: len.saturating_sub(n), last: len - 1 },
        },
        (false, _) => {
            let Some(first) = num(a) else { return RangeRequest::Full };
            let last = if b.is_empty() {
                u64::MAX
            } else {
                match num(b) {
                    Some(l) => l,
                    None => return RangeRequest::Full,
                }
            };
            if last < first {
                // Invalid (RFC 9110 14.1.1): ignored like any malformed header.
                RangeRequest::Full
            } else if first >= len {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Partial { first, last: last.min(len - 1) }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> String {
        hex::encode(digest::digest(&digest::SHA256, b))
    }

    #[test]
    fn ranges() {
        use RangeRequest::{Full, Partial, Unsatisfiable};
        let p = |first, last| Partial { first, last };
        assert_eq!(parse_range("bytes=0-9", 100), p(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), p(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), p(90, 99));
        assert_eq!(parse_range("bytes=-1000", 100), p(0, 99));
        assert_eq!(parse_range("bytes=-99999999999999999999999", 100), p(0, 99));
        // An end past the end of the body is clamped, however large.
        assert_eq!(parse_range("bytes=50-500", 100), p(50, 99));
        assert_eq!(parse_range("bytes=5-99999999999999999999999", 100), p(5, 99));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Full);
        // A start at or past the end: 416.
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=100-200", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=99999999999999999999999-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-0", 0), Unsatisfiable);
        // Malformed or another unit: ignored, the whole body.
        for bad in [
            "bytes=9-3",
            "items=0-1",
            "bytes=+1-2",
            "bytes=",
            "bytes=-",
            "bytes=a-b",
            "bytes=1",
            "bytes=0x1-2",
            "bytes=1--2",
            "bytes=-x",
        ] {
            assert_eq!(parse_range(bad, 100), Full, "{bad}");
        }
        assert_eq!(parse_range("bytes=-5", 0), Full);
    }

    #[tokio::test]
    async fn serves_only_plain_files_in_the_directory() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("vmlinuz"), b"kernel").unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/inner"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("passwd")).unwrap();
        std::os::unix::fs::symlink("sub/inner", d.path().join("inner")).unwrap();
        std::os::unix::fs::symlink("vmlinuz", d.path().join("kernel")).unwrap();
        let a = Assets::new(d.path());
        let k = a.open("vmlinuz").await.unwrap();
        assert_eq!((k.len, k.sha256_hex()), (6, sha(b"kernel")));
        // A symlink to a file in the same directory is fine.
        assert_eq!(a.open("kernel").await.unwrap().sha256_hex(), sha(b"kernel"));
        for bad in ["../etc/passwd", "sub", "passwd", "inner", ".hidden", "", "a/b", "nope", "sub/inner"] {
            assert!(a.open(bad).await.is_err(), "{bad}");
        }
        assert!(matches!(a.open("../x").await, Err(AssetError::InvalidName(_))));
        assert!(matches!(a.open("nope").await, Err(AssetError::NotFound(_))));
        assert_eq!(
            a.sha256sums().await.unwrap(),
            format!("{}  kernel\n{}  vmlinuz\n", sha(b"kernel"), sha(b"kernel"))
        );
    }

    #[tokio::test]
    async fn checksum_follows_changes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("initramfs.img");
        std::fs::write(&p, b"one").unwrap();
        let a = Assets::new(d.path());
        assert_eq!(a.open("initramfs.img").await.unwrap().sha256_hex(), sha(b"one"));
        std::fs::write(&p, b"three").unwrap();
        assert_eq!(a.open("initramfs.img").await.unwrap().sha256_hex(), sha(b"three"));
        // Whatever was read for hashing, serving starts at byte 0.
        let mut f = a.open("initramfs.img").await.unwrap();
        let mut s = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut f.file, &mut s).await.unwrap();
        assert_eq!(s, "three");
    }
}
