//! A reproducible `newc` cpio writer (the initramfs format): entries in the order given (the
//! caller sorts), mtime fixed, owner root, inode numbers by position.

use std::io::{self, Write};

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// A character device node (e.g. /dev/console 5:1).
    CharDev {
        path: String,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Symlink { path, .. }
            | Entry::CharDev { path, .. } => path,
        }
    }
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

fn pad4(w: &mut impl Write, written: usize) -> io::Result<()> {
    let pad = (4 - written % 4) % 4;
    w.write_all(&[0u8; 3][..pad])
}

#[allow(clippy::too_many_arguments)]
fn header(
    w: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    size: usize,
    rdev: (u32, u32),
    name: &str,
) -> io::Result<()> {
    let size = u32::try_from(size).map_err(|_| io::Error::other(format!("{name}: larger than 4 GiB")))?;
    let namesize = name.len() + 1;
    let h = format!(
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
        uid = 0,
        gid = 0,
        dmaj = 0,
        dmin = 0,
        rmaj = rdev.0,
        rmin = rdev.1,
        check = 0,
    );
    w.write_all(h.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w, 110 + namesize)
}

/// Writes `entries` and the trailer. Paths are written without a leading `/`.
pub fn write(w: &mut impl Write, entries: &[Entry], mtime: u32) -> io::Result<()> {
    for (i, e) in entries.iter().enumerate() {
        let ino = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let name = e.path().trim_start_matches('/');
        match e {
            Entry::Dir { mode, .. } => header(w, ino, S_IFDIR | (mode & 0o7777), 2, mtime, 0, (0, 0), name)?,
            Entry::File { mode, data, .. } => {
                header(w, ino, S_IFREG | (mode & 0o7777), 1, mtime, data.len(), (0, 0), name)?;
                w.write_all(data)?;
                pad4(w, data.len())?;
            }
            Entry::Symlink { target, .. } => {
                header(w, ino, S_IFLNK | 0o777, 1, mtime, target.len(), (0, 0), name)?;
                w.write_all(target.as_bytes())?;
                pad4(w, target.len())?;
            }
            Entry::CharDev { mode, major, minor, .. } => {
                header(w, ino, S_IFCHR | (mode & 0o7777), 1, mtime, 0, (*major, *minor), name)?
            }
        }
    }
    header(w, 0, 0, 1, 0, 0, (0, 0), "TRAILER!!!")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> Vec<Entry> {
        vec![
            Entry::Dir { path: "/bin".into(), mode: 0o755 },
            Entry::File { path: "/bin/hello".into(), mode: 0o755, data: b"#!/bin/sh\necho hi\n".to_vec() },
            Entry::Symlink { path: "/bin/hi".into(), target: "hello".into() },
            Entry::File { path: "/odd".into(), mode: 0o600, data: b"12345".to_vec() },
        ]
    }

    #[test]
    fn headers_are_aligned_and_the_trailer_ends_it() {
        let mut out = Vec::new();
        write(&mut out, &sample(), 0).unwrap();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        let tail = String::from_utf8_lossy(&out[out.len() - 16..]).into_owned();
        assert!(tail.contains("TRAILER!!!"), "{tail}");
        let mut again = Vec::new();
        write(&mut again, &sample(), 0).unwrap();
        assert_eq!(out, again, "deterministic");
    }

    #[test]
    fn busybox_cpio_reads_it_back() {
        assert!(
            std::process::Command::new("busybox").arg("true").output().is_ok(),
            "busybox is missing: apt-get install busybox-static (tests/run.sh installs it)"
        );
        let d = tempfile::tempdir().unwrap();
        let archive = d.path().join("a.cpio");
        let mut out = Vec::new();
        write(&mut out, &sample(), 0).unwrap();
        std::fs::write(&archive, &out).unwrap();
        let x = d.path().join("x");
        std::fs::create_dir(&x).unwrap();
        let st = std::process::Command::new("busybox")
            .args(["cpio", "-i", "-d", "-F"])
            .arg(&archive)
            .current_dir(&x)
            .output()
            .unwrap();
        assert!(st.status.success(), "{st:?}");
        assert_eq!(std::fs::read(x.join("bin/hello")).unwrap(), b"#!/bin/sh\necho hi\n");
        assert_eq!(std::fs::read_link(x.join("bin/hi")).unwrap().to_str(), Some("hello"));
        assert_eq!(std::fs::read(x.join("odd")).unwrap(), b"12345");
    }
}
