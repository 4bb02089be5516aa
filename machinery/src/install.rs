//! Install to disk: which disk (a selector the operator gives), and the machine's identity as
//! the installer leaves it for the installed system.
//!
//! A selector is a device path (`/dev/vda`, `/dev/disk/by-id/...`), `only-non-removable` (the
//! one disk that is not removable; refused when there are several), or conditions joined by
//! commas, all of which must hold: `serial=S`, `model=M` (a trailing `*` matches a prefix),
//! `size>=20G`, `size<=2T` (K, M, G, T: powers of 1024), `name=vda`. Conditions that match
//! several disks are refused as ambiguous: an install never guesses.

use std::fmt;

/// A disk as the agent's inventory sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Kernel name (`vda`, `sda`, `nvme0n1`).
    pub name: String,
    pub size_bytes: u64,
    pub model: String,
    pub serial: String,
    pub removable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    Name(String),
    Serial(String),
    Model(String),
    MinSize(u64),
    MaxSize(u64),
}

/// A parsed disk selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSelector {
    Path(String),
    OnlyNonRemovable,
    All(Vec<Cond>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskError {
    #[error("disk selector {0:?}: {1}")]
    Syntax(String, String),
    #[error("no disk matches {selector:?} (disks: {disks})")]
    NoMatch { selector: String, disks: String },
    #[error("{selector:?} matches several disks ({names}): make it narrower (serial=..., or a path)")]
    Ambiguous { selector: String, names: String },
    #[error("disk {name} has {have} bytes; the image needs {need}")]
    TooSmall { name: String, have: u64, need: u64 },
}

fn size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().last()? {
        (i, 'K' | 'k') => (&t[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&t[..i], 1 << 20),
        (i, 'G' | 'g') => (&t[..i], 1 << 30),
        (i, 'T' | 't') => (&t[..i], 1 << 40),
        _ => (t, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

impl DiskSelector {
    pub fn parse(text: &str) -> Result<Self, DiskError> {
        let t = text.trim();
        let bad = |why: &str| DiskError::Syntax(text.to_owned(), why.to_owned());
        if t.is_empty() {
            return Err(bad(
                "empty: give a device path, only-non-removable, or conditions like size>=20G,serial=...",
            ));
        }
        if t.starts_with('/') {
            if !t.starts_with("/dev/") || t.contains("..") || t.chars().any(char::is_whitespace) {
                return Err(bad("a path must be a device under /dev/"));
            }
            return Ok(Self::Path(t.to_owned()));
        }
        if t == "only-non-removable" {
            return Ok(Self::OnlyNonRemovable);
        }
        let mut conds = Vec::new();
        for part in t.split(',') {
            let p = part.trim();
            let c = if let Some(v) = p.strip_prefix("size>=") {
                Cond::MinSize(size(v).ok_or_else(|| bad(&format!("{v:?} is not a size (e.g. 20G)")))?)
            } else if let Some(v) = p.strip_prefix("size<=") {
                Cond::MaxSize(size(v).ok_or_else(|| bad(&format!("{v:?} is not a size (e.g. 2T)")))?)
            } else if let Some(v) = p.strip_prefix("serial=") {
                Cond::Serial(v.to_owned())
            } else if let Some(v) = p.strip_prefix("model=") {
                Cond::Model(v.to_owned())
            } else if let Some(v) = p.strip_prefix("name=") {
                Cond::Name(v.to_owned())
            } else {
                return Err(bad(&format!(
                    "{p:?} is not a condition (serial=, model=, name=, size>=, size<=) or only-non-removable"
                )));
            };
            conds.push(c);
        }
        Ok(Self::All(conds))
    }

    fn matches(&self, d: &DiskInfo) -> bool {
        match self {
            Self::Path(p) => p.strip_prefix("/dev/") == Some(d.name.as_str()),
            Self::OnlyNonRemovable => !d.removable,
            Self::All(conds) => conds.iter().all(|c| match c {
                Cond::Name(n) => &d.name == n,
                Cond::Serial(s) => &d.serial == s,
                Cond::Model(m) => match m.strip_suffix('*') {
                    Some(prefix) => d.model.starts_with(prefix),
                    None => &d.model == m,
                },
                Cond::MinSize(n) => d.size_bytes >= *n,
                Cond::MaxSize(n) => d.size_bytes <= *n,
            }),
        }
    }

    /// The one disk this selects among `disks`. A path outside `/dev/NAME` (by-id links) is
    /// resolved by the caller first; here it must name the disk directly.
    pub fn select<'a>(&self, text: &str, disks: &'a [DiskInfo]) -> Result<&'a DiskInfo, DiskError> {
        let found: Vec<&DiskInfo> = disks.iter().filter(|d| self.matches(d)).collect();
        match found.as_slice() {
            [one] => Ok(one),
            [] => Err(DiskError::NoMatch { selector: text.to_owned(), disks: describe(disks) }),
            many => Err(DiskError::Ambiguous {
                selector: text.to_owned(),
                names: many.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", "),
            }),
        }
    }
}

/// `vda 4.0 GiB "QEMU HARDDISK" serial=X, ...` for error messages.
pub fn describe(disks: &[DiskInfo]) -> String {
    if disks.is_empty() {
        return "none".into();
    }
    disks
        .iter()
        .map(|d| {
            let mut s = format!("{} {:.1} GiB", d.name, d.size_bytes as f64 / (1u64 << 30) as f64);
            if !d.model.is_empty() {
                s.push_str(&format!(" model={}", d.model));
            }
            if !d.serial.is_empty() {
                s.push_str(&format!(" serial={}", d.serial));
            }
            if d.removable {
                s.push_str(" removable");
            }
            s
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Checks the image fits the disk.
pub fn check_fits(d: &DiskInfo, need: u64) -> Result<(), DiskError> {
    if d.size_bytes < need {
        return Err(DiskError::TooSmall { name: d.name.clone(), have: d.size_bytes, need });
    }
    Ok(())
}

impl fmt::Display for DiskSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(p) => write!(f, "{p}"),
            Self::OnlyNonRemovable => write!(f, "only-non-removable"),
            Self::All(c) => write!(f, "{} condition(s)", c.len()),
        }
    }
}

/// The node OS image's partition layout (`muster image os` makes it; the installer and the
/// installed agent rely on it). GUIDs `6d757374…` ("must") are fixed, so every image is alike.
pub mod layout {
    pub const DISK_GUID: &str = "6D757374-6572-4F53-8000-000000000000";
    pub const ESP_GUID: &str = "6D757374-6572-4F53-8000-000000000001";
    pub const IDENTITY_GUID: &str = "6D757374-6572-4F53-8000-000000000002";
    pub const ROOT_GUID: &str = "6D757374-6572-4F53-8000-000000000003";
    pub const ESP_NAME: &str = "ESP";
    pub const IDENTITY_NAME: &str = "muster-identity";
    pub const ROOT_NAME: &str = "root";
    pub const ESP_MIB: u64 = 256;
    pub const IDENTITY_MIB: u64 = 1;
}

/// A partition as the GPT describes it (512-byte sectors; `first_lba <= last_lba` and its byte
/// range fits in 64 bits, as [`parse_gpt`] checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptPartition {
    pub name: String,
    pub first_lba: u64,
    pub last_lba: u64,
}

impl GptPartition {
    /// Byte offset and length.
    pub fn bytes(&self) -> (u64, u64) {
        (self.first_lba * 512, (self.last_lba - self.first_lba + 1) * 512)
    }
}

/// The disk GUID (as text, upper case) and partitions of a GPT read from a disk's first bytes
/// (the protective MBR, the header at LBA 1 and the entries, all within the first MiB).
pub fn parse_gpt(head: &[u8]) -> Option<(String, Vec<GptPartition>)> {
    let hdr = head.get(512..512 + 92)?;
    if &hdr[..8] != b"EFI PART" {
        return None;
    }
    let u64_at = |b: &[u8], o: usize| b.get(o..o + 8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes);
    let u32_at = |b: &[u8], o: usize| b.get(o..o + 4).and_then(|s| s.try_into().ok()).map(u32::from_le_bytes);
    let guid = hdr.get(56..72)?;
    let disk_guid = format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        u32::from_le_bytes(guid[0..4].try_into().ok()?),
        u16::from_le_bytes(guid[4..6].try_into().ok()?),
        u16::from_le_bytes(guid[6..8].try_into().ok()?),
        guid[8],
        guid[9],
        guid[10..16].iter().map(|b| format!("{b:02X}")).collect::<String>()
    );
    let entries_lba = u64_at(hdr, 72)?;
    let count = u32_at(hdr, 80)? as usize;
    let size = u32_at(hdr, 84)? as usize;
    if !(128..=4096).contains(&size) || count > 1024 {
        return None;
    }
    let start = usize::try_from(entries_lba).ok()?.checked_mul(512)?;
    let mut parts = Vec::new();
    for i in 0..count {
        let from = start.checked_add(i.checked_mul(size)?)?;
        let e = head.get(from..from.checked_add(size)?)?;
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let units: Vec<u16> =
            e[56..128].chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&u| u != 0).collect();
        let (first_lba, last_lba) = (u64_at(e, 32)?, u64_at(e, 40)?);
        // A partition that ends before it starts, or whose byte range does not fit in 64 bits,
        // is not one: the table is refused as a whole.
        if first_lba > last_lba || last_lba.checked_add(1)?.checked_mul(512).is_none() {
            return None;
        }
        parts.push(GptPartition { name: String::from_utf16_lossy(&units), first_lba, last_lba });
    }
    Some((disk_guid, parts))
}

/// Size and SHA-256 (hex) of everything `r` yields: how images and their downloads are named
/// (`muster image os`'s SHA256SUMS, the controller's image records).
pub fn sha256_of(mut r: impl std::io::Read) -> std::io::Result<(u64, String)> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            break;
        }
        ctx.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, hex::encode(ctx.finish())))
}

/// The start of the identity partition's content.
pub const IDENTITY_MAGIC: &[u8] = b"MUSTER-IDENTITY-1\n";

/// What the installer leaves for the installed agent: who it is and whom it talks to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub machine_id: String,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
    pub controller: String,
    /// The CA pin the live agent trusted (may be empty when it was given a CA file).
    pub ca_hash: String,
}

impl Identity {
    /// Magic, a length line, the JSON.
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let mut out = IDENTITY_MAGIC.to_vec();
        out.extend_from_slice(format!("{}\n", json.len()).as_bytes());
        out.extend_from_slice(&json);
        out
    }

    /// `None` when the bytes do not start with the magic (an empty partition).
    pub fn decode(bytes: &[u8]) -> Option<Result<Self, String>> {
        let rest = bytes.strip_prefix(IDENTITY_MAGIC)?;
        let nl = rest.iter().position(|&b| b == b'\n');
        let parsed = nl
            .and_then(|i| std::str::from_utf8(&rest[..i]).ok()?.parse::<usize>().ok().map(|n| (i, n)))
            .ok_or_else(|| "the identity's length line is malformed".to_owned())
            .and_then(|(i, n)| {
                (i + 1)
                    .checked_add(n)
                    .and_then(|end| rest.get(i + 1..end))
                    .ok_or_else(|| "the identity is cut short".to_owned())
            })
            .and_then(|json| serde_json::from_slice(json).map_err(|e| format!("the identity: {e}")));
        Some(parsed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn disk(name: &str, gib: u64, model: &str, serial: &str, removable: bool) -> DiskInfo {
        DiskInfo {
            name: name.into(),
            size_bytes: gib << 30,
            model: model.into(),
            serial: serial.into(),
            removable,
        }
    }

    #[test]
    fn selectors_pick_exactly_one_disk_or_say_why_not() {
        let disks = vec![
            disk("sda", 500, "Samsung SSD 870", "S1", false),
            disk("sdb", 32, "Cruzer", "U1", true),
            disk("nvme0n1", 1000, "WD Black", "N1", false),
        ];
        let pick = |t: &str| DiskSelector::parse(t).and_then(|s| s.select(t, &disks).map(|d| d.name.clone()));
        assert_eq!(pick("/dev/sda").unwrap(), "sda");
        assert_eq!(pick("serial=N1").unwrap(), "nvme0n1");
        assert_eq!(pick("model=Samsung*").unwrap(), "sda");
        assert_eq!(pick("size>=600G").unwrap(), "nvme0n1");
        assert_eq!(pick("size>=100G,size<=600G").unwrap(), "sda");
        assert!(
            matches!(pick("only-non-removable"), Err(DiskError::Ambiguous { names, .. }) if names == "sda, nvme0n1")
        );
        assert!(
            matches!(pick("size>=2T"), Err(DiskError::NoMatch { disks, .. }) if disks.contains("nvme0n1 1000.0 GiB"))
        );
        assert!(matches!(pick("/dev/sdz"), Err(DiskError::NoMatch { .. })));
        let one = vec![disk("vda", 4, "", "muster-disk-0", false), disk("sr0", 1, "QEMU DVD", "", true)];
        let s = DiskSelector::parse("only-non-removable").unwrap();
        assert_eq!(s.select("only-non-removable", &one).unwrap().name, "vda");
        for bad in ["", "size>=lots", "colour=red", "/etc/passwd", "/dev/../etc/passwd", "model"] {
            assert!(matches!(DiskSelector::parse(bad), Err(DiskError::Syntax(..))), "{bad:?}");
        }
        assert!(matches!(check_fits(&one[0], 5 << 30), Err(DiskError::TooSmall { .. })));
        assert!(check_fits(&one[0], 4 << 30).is_ok());
    }

    #[test]
    fn identity_round_trips_and_an_empty_partition_is_none() {
        let id = Identity {
            machine_id: "m-1".into(),
            key_pem: "K\n".into(),
            cert_pem: "C".into(),
            ca_pem: "A".into(),
            controller: "https://c:7443".into(),
            ca_hash: "sha256:ab".into(),
        };
        let mut bytes = id.encode();
        bytes.extend_from_slice(&[0; 100]);
        assert_eq!(Identity::decode(&bytes), Some(Ok(id)));
        assert_eq!(Identity::decode(&[0; 64]), None);
        let mut cut = IDENTITY_MAGIC.to_vec();
        cut.extend_from_slice(b"500\n{}");
        assert!(matches!(Identity::decode(&cut), Some(Err(e)) if e.contains("cut short")));
    }
}
