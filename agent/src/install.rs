//! Install to disk, the agent's side (it runs in the network-booted live image): pick the disk
//! the controller's selector names, download the node OS image (HTTP, resumed with `Range` when
//! the connection breaks), write it while checking both digests, read it back from the disk
//! (not the page cache) and compare, then write the partition table, then the machine's
//! identity into the image's identity partition. Only then does the controller hear
//! `installed` and switch the machine to booting from its disk; the agent reboots.
//!
//! Nothing half-written is ever booted: the first MiB (boot code, partition table) is zeroed
//! first and written last, after the rest verified; the last MiB (a backup GPT) is zeroed too.
//!
//! The installed system's agent finds the identity at first boot ([`import_identity`]) and
//! comes back as the same machine. Reset ([`reset`]) undoes an install on the disk the
//! controller recorded, and only on a disk that carries Muster's layout.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use muster_machinery::install::{check_fits, describe, layout, parse_gpt, DiskSelector, Identity};
use ring::digest;

use crate::effects::LinuxDisks;
use crate::identity::{MachineFile, StateDir};

const MIB: u64 = 1 << 20;

/// What an install asks for (from the controller's `Install`).
#[derive(Debug, Clone)]
pub struct Request {
    pub url: String,
    pub size: u64,
    pub sha256: String,
    pub raw_size: u64,
    pub raw_sha256: String,
    pub disk: String,
}

/// How long each part took.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timings {
    /// Download and write together (they stream), and the download's own share is not split:
    /// `download_ms` is the time spent waiting for the network, `write_ms` writing.
    pub download_ms: u64,
    pub write_ms: u64,
    pub verify_ms: u64,
}

/// A finished install.
#[derive(Debug, Clone)]
pub struct Installed {
    /// `/dev/vda`.
    pub device: String,
    pub timings: Timings,
}

/// Picks the disk `selector` names (a path's by-id link resolved), checking the image fits with
/// a MiB to spare (so the image's backup partition table never lands on the disk's last
/// sectors, where firmware would find it before the install is done).
pub fn pick_disk(disks: &LinuxDisks, selector: &str, need: u64) -> Result<String, String> {
    let sel = DiskSelector::parse(selector).map_err(|e| e.to_string())?;
    let all = disks.disks().map_err(|e| e.to_string())?;
    let sel = match sel {
        DiskSelector::Path(p) => {
            let name = disks.resolve(&p).map_err(|e| format!("{e} (disks: {})", describe(&all)))?;
            DiskSelector::Path(format!("/dev/{name}"))
        }
        other => other,
    };
    let d = sel.select(selector, &all).map_err(|e| e.to_string())?;
    check_fits(d, need.saturating_add(MIB)).map_err(|e| e.to_string())?;
    Ok(d.name.clone())
}

/// Attempts after a failure without progress in between.
const RETRIES: u32 = 5;

/// An HTTP/1.1 GET body that reconnects with `Range` from where it broke off (a few times).
struct Download {
    host: String,
    path: String,
    len: u64,
    at: u64,
    body: Option<BufReader<TcpStream>>,
    retries_left: u32,
    waited: Duration,
}

fn split_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// image URLs are supported"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if host.is_empty() || path.contains(['\r', '\n', ' ']) || host.contains(['\r', '\n', ' ', '@']) {
        return Err(format!("{url:?} is not a usable URL"));
    }
    let host = if host.contains(':') { host.to_owned() } else { format!("{host}:80") };
    Ok((host, path.to_owned()))
}

impl Download {
    fn new(url: &str, len: u64) -> Result<Self, String> {
        let (host, path) = split_url(url)?;
        Ok(Self { host, path, len, at: 0, body: None, retries_left: RETRIES, waited: Duration::ZERO })
    }

    fn connect(&mut self) -> std::io::Result<()> {
        let t = Instant::now();
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&self.host)?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{} resolves to nothing", self.host)))?;
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut req = format!("GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.path, self.host);
        if self.at > 0 {
            req.push_str(&format!("Range: bytes={}-\r\n", self.at));
        }
        req.push_str("\r\n");
        (&s).write_all(req.as_bytes())?;
        let mut r = BufReader::with_capacity(256 * 1024, s);
        let mut status = String::new();
        r.read_line(&mut status)?;
        let code: u16 = status.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let mut content_range = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Err(std::io::Error::other("the server closed the connection in the headers"));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-range") {
                    content_range = v.trim().to_owned();
                }
            }
        }
        let ok = match (self.at, code) {
            (0, 200) => true,
            (at, 206) => content_range.starts_with(&format!("bytes {at}-")),
            _ => false,
        };
        if !ok {
            return Err(std::io::Error::other(format!(
                "GET {} from byte {}: {} {}",
                self.path,
                self.at,
                status.trim(),
                content_range
            )));
        }
        self.waited += t.elapsed();
        self.body = Some(r);
        Ok(())
    }
}

impl Read for Download {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.at >= self.len {
                return Ok(0);
            }
            if self.body.is_none() {
                if let Err(e) = self.connect() {
                    if self.retries_left == 0 {
                        return Err(e);
                    }
                    self.retries_left -= 1;
                    tracing::warn!(error = %e, at = self.at, "image download: connecting failed; trying again");
                    std::thread::sleep(Duration::from_secs(2));
                    continue;
                }
            }
            let t = Instant::now();
            let r = match self.body.as_mut() {
                Some(b) => b.read(buf),
                None => continue,
            };
            self.waited += t.elapsed();
            match r {
                Ok(n) if n > 0 => {
                    self.at += n as u64;
                    // Progress: a later break gets its retries again.
                    self.retries_left = RETRIES;
                    return Ok(n);
                }
                // Cut short or broken: again from here, a few times.
                other => {
                    self.body = None;
                    if self.retries_left == 0 {
                        return Err(match other {
                            Err(e) => e,
                            Ok(_) => std::io::Error::other(format!(
                                "the download ended at byte {} of {}",
                                self.at, self.len
                            )),
                        });
                    }
                    self.retries_left -= 1;
                    tracing::warn!(
                        at = self.at,
                        of = self.len,
                        "image download broke off; resuming with a Range request"
                    );
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }
}

/// Hashes what passes through.
struct Hashing<R> {
    inner: R,
    ctx: digest::Context,
    n: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.ctx.update(&buf[..k]);
        self.n += k as u64;
        Ok(k)
    }
}

fn write_at(f: &mut std::fs::File, at: u64, data: &[u8], what: &str) -> Result<(), String> {
    f.seek(SeekFrom::Start(at)).map_err(|e| format!("{what}: seeking to {at}: {e}"))?;
    f.write_all(data).map_err(|e| format!("{what}: writing at {at}: {e}"))
}

/// Writes the image to the disk `name` and leaves `identity` in it. `progress` is told each
/// phase (`writing`).
pub fn install(
    disks: &LinuxDisks,
    name: &str,
    req: &Request,
    identity: &Identity,
    mut progress: impl FnMut(&str),
) -> Result<Installed, String> {
    let device = format!("/dev/{name}");
    // Exclusively: a disk with a mounted or otherwise held partition is refused (EBUSY).
    let mut f = disks.open_exclusive(name).map_err(|e| e.to_string())?;
    let disk_len = f.seek(SeekFrom::End(0)).map_err(|e| format!("sizing {device}: {e}"))?;
    if disk_len < req.raw_size.saturating_add(MIB) {
        return Err(format!(
            "{device} has {disk_len} bytes; the image needs {} and a MiB to spare",
            req.raw_size
        ));
    }
    progress("writing");
    // Not bootable from here on until the end: no old boot code or partition table survives.
    let zeros = vec![0u8; MIB as usize];
    write_at(&mut f, 0, &zeros, &device)?;
    write_at(&mut f, disk_len.saturating_sub(MIB), &zeros[..MIB.min(disk_len) as usize], &device)?;
    let started = Instant::now();
    let dl = Download::new(&req.url, req.size)?;
    let packed = Hashing { inner: dl, ctx: digest::Context::new(&digest::SHA256), n: 0 };
    let mut raw = Hashing {
        inner: flate2::read::GzDecoder::new(packed),
        ctx: digest::Context::new(&digest::SHA256),
        n: 0,
    };
    let mut head = Vec::with_capacity(MIB as usize);
    let mut buf = vec![0u8; 4 * MIB as usize];
    let mut at = 0u64;
    let mut writing = Duration::ZERO;
    loop {
        let mut k = 0;
        while k < buf.len() {
            match raw.read(&mut buf[k..]) {
                Ok(0) => break,
                Ok(n) => k += n,
                Err(e) => return Err(format!("downloading {}: {e}", req.url)),
            }
        }
        if k == 0 {
            break;
        }
        if at + k as u64 > req.raw_size {
            return Err(format!(
                "the image is longer than the {} bytes the controller announced",
                req.raw_size
            ));
        }
        let mut chunk = &buf[..k];
        // The first MiB is kept for last.
        if at < MIB {
            let take = ((MIB - at) as usize).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            at += take as u64;
            if at == MIB {
                // Not a Muster node OS image: stop before writing any of it.
                identity_range(&head)?;
            }
        }
        if !chunk.is_empty() {
            let t = Instant::now();
            write_at(&mut f, at, chunk, &device)?;
            writing += t.elapsed();
            at += chunk.len() as u64;
        }
    }
    let Hashing { inner: gz, ctx: raw_ctx, n: raw_n } = raw;
    let packed = gz.into_inner();
    let waited = packed.inner.waited;
    let (packed_sha, packed_n) = (hex::encode(packed.ctx.finish()), packed.n);
    if packed_n != req.size || packed_sha != req.sha256 {
        return Err(format!(
            "image checksum mismatch: downloaded {packed_n} bytes with sha256 {packed_sha}, expected {} bytes with sha256 {} (nothing was switched to; the disk is left unbootable)",
            req.size, req.sha256
        ));
    }
    let raw_sha = hex::encode(raw_ctx.finish());
    if raw_n != req.raw_size || raw_sha != req.raw_sha256 {
        return Err(format!(
            "the unpacked image has {raw_n} bytes with sha256 {raw_sha}, expected {} with {}",
            req.raw_size, req.raw_sha256
        ));
    }
    let t = Instant::now();
    disks.flush(&f, &device).map_err(|e| e.to_string())?;
    writing += t.elapsed();
    let total = started.elapsed();
    progress("verifying");
    // Read back what the disk has (the first MiB from memory: it is not written yet).
    let t = Instant::now();
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(&head);
    f.seek(SeekFrom::Start(MIB.min(req.raw_size))).map_err(|e| format!("{device}: {e}"))?;
    let mut left = req.raw_size.saturating_sub(MIB);
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        f.read_exact(&mut buf[..n]).map_err(|e| format!("reading back {device}: {e}"))?;
        ctx.update(&buf[..n]);
        left -= n as u64;
    }
    let back = hex::encode(ctx.finish());
    if back != req.raw_sha256 {
        return Err(format!("verify failed: {device} reads back sha256 {back}, wrote {}", req.raw_sha256));
    }
    // The identity, then the switch: boot code and partition table, checked too.
    write_identity(disks, &mut f, &device, &head, identity)?;
    write_at(&mut f, 0, &head, &device)?;
    disks.flush(&f, &device).map_err(|e| e.to_string())?;
    let mut check = vec![0u8; head.len()];
    f.seek(SeekFrom::Start(0)).map_err(|e| format!("{device}: {e}"))?;
    f.read_exact(&mut check).map_err(|e| format!("reading back {device}: {e}"))?;
    if check != head {
        return Err(format!("verify failed: {device}'s first MiB reads back differently"));
    }
    let verify = t.elapsed();
    Ok(Installed {
        device,
        timings: Timings {
            download_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            write_ms: u64::try_from(writing.as_millis().max(total.saturating_sub(waited).as_millis()))
                .unwrap_or(u64::MAX),
            verify_ms: u64::try_from(verify.as_millis()).unwrap_or(u64::MAX),
        },
    })
}

/// The identity partition's byte range, from the image's partition table.
fn identity_range(head: &[u8]) -> Result<(u64, u64), String> {
    let (_, parts) = parse_gpt(head).ok_or("the image has no GPT: not a Muster node OS image")?;
    let p = parts
        .iter()
        .find(|p| p.name == layout::IDENTITY_NAME)
        .ok_or("the image has no muster-identity partition: not a Muster node OS image")?;
    Ok(p.bytes())
}

fn write_identity(
    disks: &LinuxDisks,
    f: &mut std::fs::File,
    device: &str,
    head: &[u8],
    identity: &Identity,
) -> Result<(), String> {
    let (start, len) = identity_range(head)?;
    let blob = identity.encode();
    if blob.len() as u64 > len {
        return Err(format!("the identity ({} bytes) does not fit its partition ({len} bytes)", blob.len()));
    }
    write_at(f, start, &blob, device)?;
    disks.flush(f, device).map_err(|e| e.to_string())
}

/// Undoes an install on `device` (the one the controller recorded). Refuses a disk without
/// Muster's layout. With `wipe`, the boot code, both partition tables and the start of every
/// partition (file system signatures) are zeroed; without, only the identity partition.
pub fn reset(disks: &LinuxDisks, device: &str, wipe: bool) -> Result<(), String> {
    let name = device.strip_prefix("/dev/").ok_or_else(|| format!("{device:?} is not a /dev path"))?;
    if name.is_empty() || name.contains('/') {
        return Err(format!("{device:?} is not a disk"));
    }
    let mut f = disks.open(name).map_err(|e| e.to_string())?;
    let mut head = vec![0u8; MIB as usize];
    f.read_exact(&mut head).map_err(|e| format!("reading {device}: {e}"))?;
    let (guid, parts) = parse_gpt(&head)
        .ok_or_else(|| format!("{device} has no GPT: not the install target, not touched"))?;
    if guid != layout::DISK_GUID {
        return Err(format!("{device} is not a Muster install target (disk GUID {guid}): not touched"));
    }
    let len = f.seek(SeekFrom::End(0)).map_err(|e| format!("sizing {device}: {e}"))?;
    let zeros = vec![0u8; MIB as usize];
    if wipe {
        for p in &parts {
            let (start, n) = p.bytes();
            let n = n.min(MIB) as usize;
            write_at(&mut f, start, &zeros[..n], device)?;
        }
        write_at(&mut f, len.saturating_sub(MIB), &zeros[..MIB.min(len) as usize], device)?;
        write_at(&mut f, 0, &zeros, device)?;
    } else {
        let (start, n) = identity_range(&head)?;
        write_at(&mut f, start, &zeros[..n.min(MIB) as usize], device)?;
    }
    disks.flush(&f, device).map_err(|e| e.to_string())
}

/// The disk (its name in `sys_class_block`) holding the partition whose device number is
/// `root_dev` (`MAJOR:MINOR`), i.e. the disk the running system's `/` is on.
fn disk_of(sys_class_block: &Path, root_dev: &str) -> Option<String> {
    let rd = std::fs::read_dir(sys_class_block).ok()?;
    rd.flatten().find_map(|e| {
        let dev = std::fs::read_to_string(e.path().join("dev")).ok()?;
        if dev.trim() != root_dev {
            return None;
        }
        // /sys/class/block/vda3 -> .../block/vda/vda3: the parent directory is the disk.
        let real = std::fs::canonicalize(e.path()).ok()?;
        Some(real.parent()?.file_name()?.to_string_lossy().into_owned())
    })
}

/// The identity partition's device: a partition named `muster-identity` on the same disk as
/// the running system's root (never one on another disk, say a USB stick someone plugged in).
fn identity_partition(sys_class_block: &Path, dev: &Path, root_dev: &str) -> Option<std::path::PathBuf> {
    let root_disk = disk_of(sys_class_block, root_dev)?;
    let mut entries: Vec<_> = std::fs::read_dir(sys_class_block).ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    entries.into_iter().find_map(|e| {
        let uevent = std::fs::read_to_string(e.path().join("uevent")).ok()?;
        let named = uevent.lines().any(|l| l == format!("PARTNAME={}", layout::IDENTITY_NAME));
        let real = std::fs::canonicalize(e.path()).ok()?;
        let on_root_disk = real.parent()?.file_name()?.to_string_lossy() == root_disk.as_str();
        (named && on_root_disk).then(|| dev.join(e.file_name()))
    })
}

/// `MAJOR:MINOR` of the file system holding `/`.
pub fn root_device() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let d = std::fs::metadata("/").ok()?.dev();
    Some(format!("{}:{}", libc::major(d), libc::minor(d)))
}

/// At the installed system's first boot: takes the identity the installer left (key,
/// certificate, CA, machine id, controller) into the state dir, writes the controller's
/// settings to `env_file` when it has none, and clears the partition. `Ok(None)`: nothing to
/// take (no partition, or it is empty).
pub fn import_identity(
    sys_class_block: &Path,
    dev: &Path,
    root_dev: &str,
    state: &StateDir,
    env_file: &Path,
) -> Result<Option<String>, String> {
    let Some(part) = identity_partition(sys_class_block, dev, root_dev) else { return Ok(None) };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&part)
        .map_err(|e| format!("opening {}: {e}", part.display()))?;
    let mut blob = vec![0u8; 64 * 1024];
    let n = f.read(&mut blob).map_err(|e| format!("reading {}: {e}", part.display()))?;
    let Some(id) = Identity::decode(&blob[..n]) else { return Ok(None) };
    let id = id.map_err(|e| format!("{}: {e}", part.display()))?;
    let have = state.load_key().map_err(|e| e.to_string())?.is_some();
    if !have {
        state.create().map_err(|e| e.to_string())?;
        state.write_key(&id.key_pem).map_err(|e| e.to_string())?;
        state.write_cert(&id.cert_pem).map_err(|e| e.to_string())?;
        state.write_ca(&id.ca_pem).map_err(|e| e.to_string())?;
        state
            .write_machine(&MachineFile {
                machine_id: id.machine_id.clone(),
                controller: id.controller.clone(),
                assignment: None,
            })
            .map_err(|e| e.to_string())?;
    }
    // The controller's settings go into the env file unless it names them (an image may have
    // baked some settings, e.g. only a boot token).
    let existing = std::fs::read_to_string(env_file).unwrap_or_default();
    let has = |key: &str| crate::settings::env_file_sets(env_file, key);
    let mut text = existing.clone();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    if !has("controller") {
        text.push_str(&format!(
            "# From the identity this system's installer left.\nMUSTER_CONTROLLER={}\n",
            id.controller
        ));
    }
    if !id.ca_hash.is_empty() && !has("ca_hash") {
        text.push_str(&format!("MUSTER_CA_HASH={}\n", id.ca_hash));
    }
    if text != existing {
        if let Some(d) = env_file.parent() {
            std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
        }
        crate::identity::write_atomic(env_file, text.as_bytes(), 0o600).map_err(|e| e.to_string())?;
    }
    // The key does not stay on a partition anyone with the disk can read.
    f.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    f.write_all(&vec![0u8; n]).map_err(|e| format!("clearing {}: {e}", part.display()))?;
    f.sync_all().map_err(|e| format!("syncing {}: {e}", part.display()))?;
    Ok(Some(id.machine_id))
}

/// Runs installs and resets for the session: one at a time, on a thread of its own (disk I/O
/// blocks), reporting over the stream through [`Installer::outbox`], rebooting when done.
pub(crate) struct Installer {
    disks: Option<LinuxDisks>,
    tx: tokio::sync::mpsc::UnboundedSender<muster_proto::pb::InstallStatus>,
    rx: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<muster_proto::pb::InstallStatus>>,
    busy: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The last `installed` or `reset` report: sent again on every new stream until the node
    /// reboots (a report lost with a broken stream is not lost).
    last: std::sync::Arc<std::sync::Mutex<Option<muster_proto::pb::InstallStatus>>>,
    /// The controller forgot this machine (the end of a reset): reboot now.
    forgotten: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Clears `busy` however the installer's thread ends (a panic included).
struct Busy(std::sync::Arc<std::sync::atomic::AtomicBool>);
impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Installer {
    /// `disks: None`: this agent does not own its node (lab, `--no-apply-config`) and refuses.
    pub(crate) fn new(disks: Option<LinuxDisks>) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            disks,
            tx,
            rx: tokio::sync::Mutex::new(rx),
            busy: Default::default(),
            last: Default::default(),
            forgotten: Default::default(),
        }
    }

    /// The final report to send again on a new stream, if one is waiting for the reboot.
    pub(crate) fn unconfirmed(&self) -> Option<muster_proto::pb::InstallStatus> {
        self.last.lock().ok().and_then(|l| l.clone())
    }

    /// The controller ended this machine's stream for good (it forgot the machine).
    pub(crate) fn forgotten(&self) {
        self.forgotten.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Returns once no install or reset runs (one that succeeded reboots the node first).
    pub(crate) async fn wait_idle(&self) {
        while self.busy.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn outbox(
        &self,
    ) -> tokio::sync::MutexGuard<'_, tokio::sync::mpsc::UnboundedReceiver<muster_proto::pb::InstallStatus>>
    {
        self.rx.lock().await
    }

    fn refuse(&self, image: &str, why: String) {
        tracing::warn!(error = %why, "install refused");
        let _ = self.tx.send(muster_proto::pb::InstallStatus {
            image: image.to_owned(),
            phase: "failed".into(),
            error: why,
            ..Default::default()
        });
    }

    /// Starts an install (unless one runs). After `installed` is on its way, waits until the
    /// controller has acknowledged two heartbeats sent after it (it handles a stream's
    /// messages in order, so it has recorded the install), then reboots.
    /// Runs `job` on a thread of its own unless this agent does not own its node (refused,
    /// reported as failed for `image`) or another install or reset runs.
    fn spawn(
        &self,
        image: &str,
        what: &str,
        status: tokio::sync::watch::Receiver<crate::AgentStatus>,
        job: impl FnOnce(Job) + Send + 'static,
    ) {
        let Some(disks) = self.disks.clone() else {
            return self.refuse(
                image,
                format!("this agent does not own its node (--no-apply-config): it {what} nothing"),
            );
        };
        if self.busy.swap(true, std::sync::atomic::Ordering::SeqCst) {
            tracing::info!(image, "an install or reset is already running");
            return;
        }
        let busy = Busy(self.busy.clone());
        let job_ = Job {
            disks,
            tx: self.tx.clone(),
            last: self.last.clone(),
            forgotten: self.forgotten.clone(),
            status,
        };
        std::thread::spawn(move || {
            let _busy = busy;
            job(job_);
        });
    }

    /// Starts an install. After `installed` is on its way, waits until the controller has
    /// acknowledged it (see [`Job::finish`]), then reboots.
    pub(crate) fn start_install(
        &self,
        req: muster_proto::pb::Install,
        identity: Identity,
        status: tokio::sync::watch::Receiver<crate::AgentStatus>,
    ) {
        let image = req.image.clone();
        self.spawn(&req.image, "installs", status, move |job| {
            let r = Request {
                url: req.url,
                size: req.size,
                sha256: req.sha256,
                raw_size: req.raw_size,
                raw_sha256: req.raw_sha256,
                disk: req.disk,
            };
            tracing::info!(image = %image, disk = %r.disk, url = %r.url, "installing {image} to disk {}", r.disk);
            let result = pick_disk(&job.disks, &r.disk, r.raw_size).and_then(|name| {
                install(&job.disks, &name, &r, &identity, |phase| {
                    tracing::info!(phase, disk = %name, "install: {phase} /dev/{name}");
                    if phase == "writing" {
                        job.report(muster_proto::pb::InstallStatus {
                            image: image.clone(),
                            phase: phase.into(),
                            disk: format!("/dev/{name}"),
                            ..Default::default()
                        });
                    }
                })
            });
            match result {
                Ok(done) => {
                    tracing::info!(
                        disk = %done.device,
                        download_ms = done.timings.download_ms,
                        write_ms = done.timings.write_ms,
                        verify_ms = done.timings.verify_ms,
                        "installed to {}; rebooting from it",
                        done.device
                    );
                    job.finish(muster_proto::pb::InstallStatus {
                        image,
                        phase: "installed".into(),
                        disk: done.device,
                        download_ms: done.timings.download_ms,
                        write_ms: done.timings.write_ms,
                        verify_ms: done.timings.verify_ms,
                        ..Default::default()
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, "install failed: {e}");
                    job.report(muster_proto::pb::InstallStatus {
                        image,
                        phase: "failed".into(),
                        error: e,
                        ..Default::default()
                    });
                }
            }
        });
    }

    /// Starts a reset of `device`; on success forgets this agent's identity and reboots.
    pub(crate) fn start_reset(
        &self,
        req: muster_proto::pb::Reset,
        state: StateDir,
        status: tokio::sync::watch::Receiver<crate::AgentStatus>,
    ) {
        self.spawn("", "resets", status, move |job| {
            tracing::info!(disk = %req.disk, wipe = req.wipe, "resetting {} (wipe: {})", req.disk, req.wipe);
            match reset(&job.disks, &req.disk, req.wipe) {
                Ok(()) => {
                    if let Err(e) = state.wipe() {
                        tracing::warn!(error = %e, "could not clear the state dir");
                    }
                    job.finish(muster_proto::pb::InstallStatus {
                        phase: "reset".into(),
                        disk: req.disk,
                        ..Default::default()
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, "reset failed: {e}");
                    job.report(muster_proto::pb::InstallStatus {
                        phase: "failed".into(),
                        disk: req.disk,
                        error: format!("reset: {e}"),
                        ..Default::default()
                    });
                }
            }
        });
    }
}

/// What an install's or reset's thread works and reports with.
struct Job {
    disks: LinuxDisks,
    tx: tokio::sync::mpsc::UnboundedSender<muster_proto::pb::InstallStatus>,
    last: std::sync::Arc<std::sync::Mutex<Option<muster_proto::pb::InstallStatus>>>,
    forgotten: std::sync::Arc<std::sync::atomic::AtomicBool>,
    status: tokio::sync::watch::Receiver<crate::AgentStatus>,
}

impl Job {
    /// A progress or failure report.
    fn report(&self, st: muster_proto::pb::InstallStatus) {
        let _ = self.tx.send(st);
    }

    /// The job's last word: kept to be sent again on a new stream, then the node reboots once
    /// the controller has it (see [`reboot_after_ack`]).
    fn finish(self, st: muster_proto::pb::InstallStatus) {
        if let Ok(mut l) = self.last.lock() {
            *l = Some(st.clone());
        }
        self.report(st);
        reboot_after_ack(&self.disks, self.status, &self.forgotten);
    }
}

/// Waits until the controller has the report: two more heartbeats acknowledged (it handles a
/// stream's messages in order; a new stream sends the report again first), or the controller
/// forgot the machine (a reset's end). After 5 minutes without either it reboots anyway.
fn reboot_after_ack(
    disks: &LinuxDisks,
    mut status: tokio::sync::watch::Receiver<crate::AgentStatus>,
    forgotten: &std::sync::atomic::AtomicBool,
) {
    let start = status.borrow().heartbeats_acked;
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        let s = status.borrow_and_update().clone();
        if s.heartbeats_acked >= start + 2 || forgotten.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Err(e) = disks.reboot() {
        tracing::error!(error = %e, "could not reboot");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// A GPT disk image with Muster's layout, made by the real sfdisk (small sizes).
    fn image(dir: &Path) -> Vec<u8> {
        image_with(dir, layout::DISK_GUID)
    }

    fn image_with(dir: &Path, disk_guid: &str) -> Vec<u8> {
        let p = dir.join(format!("img-{disk_guid}.raw"));
        std::fs::File::create(&p).unwrap().set_len(8 * MIB).unwrap();
        let script = format!(
            "label: gpt\nlabel-id: {}\nfirst-lba: 2048\nstart=2048, size=2048, name=\"ESP\"\nsize=2048, name=\"{}\"\nsize=4096, name=\"root\"\n",
            disk_guid,
            layout::IDENTITY_NAME
        );
        let mut child = std::process::Command::new("sfdisk")
            .args(["--quiet", "--no-reread", "--no-tell-kernel"])
            .arg(&p)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sfdisk (apt-get install fdisk)");
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
        let mut data = std::fs::read(&p).unwrap();
        // Content in the partitions, to tell a good write from a bad one.
        for (i, b) in data.iter_mut().enumerate().skip(MIB as usize).take(6 * MIB as usize) {
            *b = (i % 251) as u8;
        }
        // The identity partition is empty in an image.
        let id_start = 2 * MIB as usize;
        data[id_start..id_start + MIB as usize].fill(0);
        data
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn sha(b: &[u8]) -> String {
        hex::encode(digest::digest(&digest::SHA256, b))
    }

    /// An HTTP server on loopback serving `body`; the first response is cut after `cut` bytes.
    fn serve(body: Vec<u8>, cut: usize) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/images/img.raw.gz", l.local_addr().unwrap());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for (i, s) in l.incoming().enumerate() {
                let mut s = s.unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut range = 0usize;
                loop {
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = line.trim().strip_prefix("Range: bytes=") {
                        range = v.trim_end_matches('-').parse().unwrap();
                    }
                    seen2.lock().unwrap().push(line.trim().to_owned());
                }
                let part = &body[range..];
                let head = if range == 0 {
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", part.len())
                } else {
                    format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {range}-{}/{}\r\nContent-Length: {}\r\n\r\n",
                        body.len() - 1,
                        body.len(),
                        part.len()
                    )
                };
                s.write_all(head.as_bytes()).unwrap();
                let n = if i == 0 { cut.min(part.len()) } else { part.len() };
                let _ = s.write_all(&part[..n]);
            }
        });
        (url, seen)
    }

    fn disk_dir(dir: &Path, name: &str, bytes: u64, serial: &str) {
        let sys = dir.join("sys/block").join(name);
        std::fs::create_dir_all(&sys).unwrap();
        std::fs::write(sys.join("size"), format!("{}\n", bytes / 512)).unwrap();
        std::fs::write(sys.join("removable"), "0\n").unwrap();
        std::fs::write(sys.join("serial"), serial).unwrap();
        std::fs::create_dir_all(dir.join("dev")).unwrap();
        let f = std::fs::File::create(dir.join("dev").join(name)).unwrap();
        f.set_len(bytes).unwrap();
        // Old content: a previous OS.
        std::fs::write(dir.join("dev").join(name), vec![0xee; bytes as usize]).unwrap();
    }

    fn identity() -> Identity {
        Identity {
            machine_id: "0123456789abcdef".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----\nk\n-----END PRIVATE KEY-----\n".into(),
            cert_pem: "C".into(),
            ca_pem: "A".into(),
            controller: "https://10.0.2.100:7443".into(),
            ca_hash: "sha256:00".into(),
        }
    }

    #[test]
    fn an_interrupted_download_resumes_and_the_disk_gets_image_identity_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let raw = image(dir.path());
        let packed = gz(&raw);
        let (url, seen) = serve(packed.clone(), packed.len() / 3);
        disk_dir(dir.path(), "vda", 16 * MIB, "muster-disk-0");
        disk_dir(dir.path(), "vdb", 4 * MIB, "small");
        let disks = LinuxDisks::rooted(dir.path(), Arc::new(AtomicUsize::new(0)));
        let req = Request {
            url,
            size: packed.len() as u64,
            sha256: sha(&packed),
            raw_size: raw.len() as u64,
            raw_sha256: sha(&raw),
            disk: "serial=muster-disk-0".into(),
        };
        let name = pick_disk(&disks, &req.disk, req.raw_size).unwrap();
        assert_eq!(name, "vda");
        let mut phases = Vec::new();
        let done = install(&disks, &name, &req, &identity(), |p| phases.push(p.to_owned())).unwrap();
        assert_eq!(done.device, "/dev/vda");
        assert_eq!(phases, ["writing", "verifying"]);
        // The first response was cut: the second asked for the rest.
        let seen = seen.lock().unwrap().clone();
        assert!(seen.iter().any(|l| l == &format!("Range: bytes={}-", packed.len() / 3)), "{seen:?}");
        let disk = std::fs::read(dir.path().join("dev/vda")).unwrap();
        let id_start = 2 * MIB as usize;
        // Everything but the identity partition is the image.
        assert_eq!(&disk[..id_start], &raw[..id_start]);
        assert_eq!(&disk[id_start + MIB as usize..raw.len()], &raw[id_start + MIB as usize..]);
        assert_eq!(Identity::decode(&disk[id_start..id_start + MIB as usize]), Some(Ok(identity())));
        // The rest of the disk: the old content, but its last MiB (an old backup GPT) is gone.
        assert!(disk[raw.len()..disk.len() - MIB as usize].iter().all(|&b| b == 0xee));
        assert!(disk[disk.len() - MIB as usize..].iter().all(|&b| b == 0));
        // Too small, no match, ambiguous: refused before anything is written.
        let small = pick_disk(&disks, "serial=small", req.raw_size).unwrap_err();
        assert!(small.contains("the image needs"), "{small}");
        assert!(pick_disk(&disks, "serial=nope", 1).unwrap_err().contains("no disk matches"));
        assert!(pick_disk(&disks, "only-non-removable", 1).unwrap_err().contains("several disks"));

        // The installed system takes the identity and clears the partition; only from the disk
        // its root is on (sysfs as the kernel lays it out: class links into the devices tree).
        let blob = disk[id_start..id_start + MIB as usize].to_vec();
        let class = dir.path().join("sys/class/block");
        std::fs::create_dir_all(&class).unwrap();
        for (disk_name, part, dev, name) in [
            ("vda", "vda2", "254:2", layout::IDENTITY_NAME),
            ("vda", "vda3", "254:3", "root"),
            ("sdz", "sdz1", "8:1", layout::IDENTITY_NAME),
        ] {
            let real = dir.path().join("sys/devices").join(disk_name).join(part);
            std::fs::create_dir_all(&real).unwrap();
            std::fs::write(real.join("dev"), format!("{dev}\n")).unwrap();
            std::fs::write(real.join("uevent"), format!("DEVNAME={part}\nPARTNAME={name}\n")).unwrap();
            std::os::unix::fs::symlink(&real, class.join(part)).unwrap();
            std::fs::write(dir.path().join("dev").join(part), &blob).unwrap();
        }
        let devs = dir.path().join("dev");
        let state = StateDir::new(dir.path().join("state"));
        let env = dir.path().join("etc/muster/agent.env");
        // Root on a disk without an identity partition: nothing is taken.
        assert_eq!(import_identity(&class, &devs, "9:9", &state, &env).unwrap(), None);
        // An image that baked only a boot token: the controller's lines are added.
        std::fs::create_dir_all(env.parent().unwrap()).unwrap();
        // (An empty value is no value, as the agent reads it: the controller's line is added.)
        std::fs::write(&env, "MUSTER_TOKEN=t\nMUSTER_CONTROLLER=").unwrap();
        let got = import_identity(&class, &devs, "254:3", &state, &env).unwrap();
        assert_eq!(got.as_deref(), Some("0123456789abcdef"));
        assert_eq!(state.load_key().unwrap().as_deref(), Some(identity().key_pem.as_str()));
        let text = std::fs::read_to_string(&env).unwrap();
        assert!(text.starts_with("MUSTER_TOKEN=t\nMUSTER_CONTROLLER=\n"), "{text}");
        assert!(crate::settings::env_file_sets(&env, "controller"), "{text}");
        assert!(
            text.contains("\nMUSTER_CONTROLLER=https://10.0.2.100:7443\nMUSTER_CA_HASH=sha256:00\n"),
            "{text}"
        );
        assert!(std::fs::read(devs.join("vda2")).unwrap().iter().all(|&b| b == 0));
        assert_eq!(std::fs::read(devs.join("sdz1")).unwrap(), blob, "another disk's is left alone");
        assert_eq!(import_identity(&class, &devs, "254:3", &state, &env).unwrap(), None);
    }

    #[test]
    fn a_wrong_checksum_is_refused_and_leaves_the_disk_unbootable() {
        let dir = tempfile::tempdir().unwrap();
        let raw = image(dir.path());
        let packed = gz(&raw);
        let (url, _) = serve(packed.clone(), usize::MAX);
        disk_dir(dir.path(), "vda", 16 * MIB, "d0");
        let disks = LinuxDisks::rooted(dir.path(), Arc::new(AtomicUsize::new(0)));
        let req = Request {
            url,
            size: packed.len() as u64,
            sha256: "00".repeat(32),
            raw_size: raw.len() as u64,
            raw_sha256: sha(&raw),
            disk: "/dev/vda".into(),
        };
        let e = install(&disks, "vda", &req, &identity(), |_| {}).unwrap_err();
        assert!(e.contains("image checksum mismatch"), "{e}");
        let disk = std::fs::read(dir.path().join("dev/vda")).unwrap();
        assert!(disk[..MIB as usize].iter().all(|&b| b == 0), "no boot code or partition table was written");
    }

    #[test]
    fn reset_wipes_only_a_muster_disk() {
        let dir = tempfile::tempdir().unwrap();
        let raw = image(dir.path());
        disk_dir(dir.path(), "vda", 16 * MIB, "d0");
        disk_dir(dir.path(), "vdb", 16 * MIB, "d1");
        let mut disk = raw.clone();
        disk.resize(16 * MIB as usize, 0x11);
        std::fs::write(dir.path().join("dev/vda"), &disk).unwrap();
        // Another system's GPT disk (same layout, its own disk GUID) and a disk without a GPT.
        let mut other = image_with(dir.path(), "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
        other.resize(16 * MIB as usize, 0x22);
        std::fs::write(dir.path().join("dev/vdb"), &other).unwrap();
        disk_dir(dir.path(), "vdc", 16 * MIB, "d2");
        let disks = LinuxDisks::rooted(dir.path(), Arc::new(AtomicUsize::new(0)));
        let e = reset(&disks, "/dev/vdb", true).unwrap_err();
        assert!(e.contains("is not a Muster install target"), "{e}");
        assert_eq!(std::fs::read(dir.path().join("dev/vdb")).unwrap(), other);
        let e = reset(&disks, "/dev/vdc", true).unwrap_err();
        assert!(e.contains("has no GPT"), "{e}");
        assert!(std::fs::read(dir.path().join("dev/vdc")).unwrap().iter().all(|&b| b == 0xee));
        reset(&disks, "/dev/vda", true).unwrap();
        let after = std::fs::read(dir.path().join("dev/vda")).unwrap();
        assert!(parse_gpt(&after).is_none(), "the partition table is gone");
        assert!(after[..4 * MIB as usize].iter().all(|&b| b == 0));
        assert!(after[after.len() - MIB as usize..].iter().all(|&b| b == 0));
    }
}
