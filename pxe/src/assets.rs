//! Boot assets (kernel, initramfs, …) served from one directory, with SHA-256 checksums.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use ring::digest;

/// Files directly in one directory. Names are plain file names: no separators, no `..`, no
/// hidden files; symlinks are not followed out of the directory.
#[derive(Debug)]
pub struct Assets {
    dir: PathBuf,
    /// SHA-256 by name, valid while (size, mtime) is unchanged.
    sums: Mutex<HashMap<String, (u64, SystemTime, String)>>,
}

/// A served file: its bytes and checksum.
#[derive(Debug, Clone)]
pub struct Asset {
    pub bytes: Vec<u8>,
    pub sha256: String,
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

    /// Reads `name`; `None` if it is not a servable regular file.
    pub async fn read(&self, name: &str) -> Option<Asset> {
        if !Self::valid_name(name) {
            return None;
        }
        let path = self.dir.join(name);
        let meta = tokio::fs::symlink_metadata(&path).await.ok()?;
        if !meta.is_file() {
            return None;
        }
        let bytes = tokio::fs::read(&path).await.ok()?;
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let cached = self.sums.lock().ok().and_then(|s| {
            s.get(name).filter(|(l, m, _)| *l == meta.len() && *m == mtime).map(|(_, _, h)| h.clone())
        });
        let sha256 = match cached {
            Some(h) => h,
            None => {
                let h = hex::encode(digest::digest(&digest::SHA256, &bytes));
                if let Ok(mut s) = self.sums.lock() {
                    s.insert(name.to_owned(), (meta.len(), mtime, h.clone()));
                }
                h
            }
        };
        Some(Asset { bytes, sha256 })
    }

    /// `sha256sum` lines for every servable file, sorted by name.
    pub async fn sha256sums(&self) -> Result<String, std::io::Error> {
        let mut names = Vec::new();
        let mut rd = tokio::fs::read_dir(&self.dir).await?;
        while let Some(e) = rd.next_entry().await? {
            if let Some(n) = e.file_name().to_str() {
                if Self::valid_name(n) && n != "SHA256SUMS" && e.file_type().await.is_ok_and(|t| t.is_file())
                {
                    names.push(n.to_owned());
                }
            }
        }
        names.sort();
        let mut out = String::new();
        for n in names {
            if let Some(a) = self.read(&n).await {
                out.push_str(&format!("{}  {n}\n", a.sha256));
            }
        }
        Ok(out)
    }
}

/// A single byte range of a `len`-byte body: `Ok(None)` for the whole body, `Err(())` when
/// unsatisfiable.
pub fn parse_range(header: &str, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let spec = header.trim().strip_prefix("bytes=").ok_or(())?;
    if spec.contains(',') {
        // Several ranges: answer with the whole body (allowed by RFC 9110).
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = match (a.is_empty(), b.is_empty()) {
        (true, true) => return Err(()),
        (true, false) => {
            let n: u64 = b.parse().map_err(|_| ())?;
            if n == 0 || len == 0 {
                return Err(());
            }
            (len.saturating_sub(n), len - 1)
        }
        (false, _) => {
            let s: u64 = a.parse().map_err(|_| ())?;
            let e: u64 = if b.is_empty() { len.saturating_sub(1) } else { b.parse().map_err(|_| ())? };
            if s >= len || e < s {
                return Err(());
            }
            (s, e.min(len - 1))
        }
    };
    Ok(Some((start, end)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=50-500", 100), Ok(Some((50, 99))));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(parse_range("bytes=100-", 100), Err(()));
        assert_eq!(parse_range("bytes=9-3", 100), Err(()));
        assert_eq!(parse_range("items=0-1", 100), Err(()));
        assert_eq!(parse_range("bytes=-0", 100), Err(()));
    }

    #[tokio::test]
    async fn serves_only_plain_files_in_the_directory() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("vmlinuz"), b"kernel").unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("passwd")).unwrap();
        let a = Assets::new(d.path());
        let k = a.read("vmlinuz").await.unwrap();
        assert_eq!(k.bytes, b"kernel");
        assert_eq!(k.sha256, hex::encode(digest::digest(&digest::SHA256, b"kernel")));
        for bad in ["../etc/passwd", "sub", "passwd", ".hidden", "", "a/b"] {
            assert!(a.read(bad).await.is_none(), "{bad}");
        }
        assert_eq!(a.sha256sums().await.unwrap(), format!("{}  vmlinuz\n", k.sha256));
    }
}
