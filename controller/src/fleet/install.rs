//! Install to disk, the controller's side: node OS images (files in `DATA_DIR/images`, added
//! with `muster-controller image add`, served at `/images/NAME.raw.gz` beside the boot assets),
//! a machine's install target and progress, and reset.
//!
//! The order that keeps a half-written disk from ever booting: the agent writes, verifies and
//! only then reports `installed`; only an installed machine's boot script says `exit` (boot
//! from the disk). Until then every boot is a network boot into the live image.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use muster_machinery::install::{check_fits, DiskInfo, DiskSelector};
use muster_machinery::model::MachineId;
use muster_proto::pb;
use serde::{Deserialize, Serialize};
use tonic::Status;

use super::{Controller, FleetError};
use crate::store::{InstallState, MachineRecord};

/// Where the images are and how machines reach them.
#[derive(Debug, Clone)]
pub struct Images {
    pub dir: PathBuf,
    /// The HTTP service as machines reach it (`http://10.0.0.1:7480`).
    pub base_url: String,
}

/// An image as `image add` recorded it (`NAME.json` beside `NAME.raw.gz`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    pub name: String,
    /// The served file (gzip'd raw disk image).
    pub file: String,
    pub size: u64,
    pub sha256: String,
    /// What ends up on the disk.
    pub raw_size: u64,
    pub raw_sha256: String,
    pub added_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image name {0:?}: use letters, digits, '-', '_' and '.' (at most 64, not starting with '.')")]
    Name(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io { path: path.to_owned(), source }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// The images directory of a data dir.
pub fn images_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("images")
}

/// Adds a node OS image (`muster image os`'s `muster-os.raw.gz`, or a raw image, which is
/// compressed here) as `name`: copied into `dir`, with its digests. Replaces an image of that
/// name.
pub fn add_image(dir: &Path, file: &Path, name: &str, now_ms: i64) -> Result<ImageMeta, ImageError> {
    if !valid_name(name) {
        return Err(ImageError::Name(name.to_owned()));
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut head = [0u8; 2];
    let mut f = std::fs::File::open(file).map_err(io_err(file))?;
    let gz = f.read_exact(&mut head).is_ok() && head == [0x1f, 0x8b];
    let served = format!("{name}.raw.gz");
    let tmp = dir.join(format!(".{served}.tmp-{}", std::process::id()));
    let result = (|| {
        if gz {
            std::fs::copy(file, &tmp).map_err(io_err(file))?;
        } else {
            let mut input = std::fs::File::open(file).map_err(io_err(file))?;
            let out = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
            let mut enc =
                flate2::write::GzEncoder::new(std::io::BufWriter::new(out), flate2::Compression::fast());
            std::io::copy(&mut input, &mut enc).map_err(io_err(file))?;
            enc.finish().map_err(io_err(&tmp))?;
        }
        // The served file's digest, and the raw image's (decompressing it once).
        let (size, sha256) = digest_of(std::fs::File::open(&tmp).map_err(io_err(&tmp))?, &tmp)?;
        let gzr = flate2::read::GzDecoder::new(std::io::BufReader::new(
            std::fs::File::open(&tmp).map_err(io_err(&tmp))?,
        ));
        let (raw_size, raw_sha256) = digest_of(gzr, file)
            .map_err(|e| ImageError::Invalid(format!("{}: not a gzip'd disk image ({e})", file.display())))?;
        if raw_size < 1 << 20 {
            return Err(ImageError::Invalid(format!(
                "{}: {raw_size} bytes is no disk image",
                file.display()
            )));
        }
        Ok((size, sha256, raw_size, raw_sha256))
    })();
    let (size, sha256, raw_size, raw_sha256) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let meta = ImageMeta {
        name: name.to_owned(),
        file: served.clone(),
        size,
        sha256,
        raw_size,
        raw_sha256,
        added_ms: now_ms,
    };
    let dst = dir.join(&served);
    std::fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| ImageError::Invalid(e.to_string()))?;
    let meta_path = dir.join(format!("{name}.json"));
    muster_util::write_atomic(&meta_path, &json, 0o644).map_err(io_err(&meta_path))?;
    Ok(meta)
}

fn digest_of(r: impl std::io::Read, path: &Path) -> Result<(u64, String), ImageError> {
    muster_machinery::install::sha256_of(r).map_err(io_err(path))
}

/// The images in `dir`, by name.
pub fn list_images(dir: &Path) -> Result<Vec<ImageMeta>, ImageError> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(ImageError::Io { path: dir.to_owned(), source: e }),
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json") {
            let text = std::fs::read(&p).map_err(io_err(&p))?;
            let m: ImageMeta = serde_json::from_slice(&text)
                .map_err(|e| ImageError::Invalid(format!("{}: {e}", p.display())))?;
            out.push(m);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn disks_of(m: &MachineRecord) -> Vec<DiskInfo> {
    m.inventory
        .disks
        .iter()
        .map(|d| DiskInfo {
            name: d.name.clone(),
            size_bytes: d.size_bytes,
            model: d.model.clone(),
            serial: d.serial.clone(),
            removable: d.removable,
        })
        .collect()
}

impl Controller {
    /// Serves images from `images` (set when network boot is served).
    pub fn set_images(&self, images: Images) {
        let _ = self.inner.images.set(images);
    }

    fn images(&self) -> Result<&Images, FleetError> {
        self.inner.images.get().ok_or_else(|| {
            FleetError::invalid("image", "this controller serves no images: start it with --boot-assets (install to disk is a network-boot flow)")
        })
    }

    /// The images this controller serves.
    pub fn list_images(&self) -> Result<Vec<ImageMeta>, FleetError> {
        let images = self.images()?;
        list_images(&images.dir).map_err(|e| FleetError::Internal(e.to_string()))
    }

    fn image(&self, name: &str) -> Result<ImageMeta, FleetError> {
        let all = self.list_images()?;
        let names: Vec<String> = all.iter().map(|i| i.name.clone()).collect();
        all.into_iter().find(|i| i.name == name).ok_or_else(|| {
            FleetError::NotFound(format!(
                "no image {name:?} (images: {}; add one with `muster-controller image add FILE --name NAME`)",
                if names.is_empty() { "none".to_owned() } else { names.join(", ") }
            ))
        })
    }

    /// `muster machine install`: writes `image` to the machine's disk selected by `disk`. The
    /// machine must be approved, and (when its inventory lists disks) exactly one must match
    /// and be big enough.
    pub async fn install(&self, query: &str, image: &str, disk: &str) -> Result<MachineRecord, FleetError> {
        let m = self.resolve(query)?;
        let refuse = |reason: String| FleetError::Install { id: m.id.clone(), reason };
        if m.revoked {
            return Err(FleetError::MachineRevoked(m.id.clone()));
        }
        if !m.approved {
            return Err(refuse(
                "is not approved: `muster approve` it first (a pending machine gets nothing)".into(),
            ));
        }
        let sel = DiskSelector::parse(disk).map_err(|e| FleetError::invalid("disk", e.to_string()))?;
        let img = self.image(image)?;
        let disks = disks_of(&m);
        if !disks.is_empty() {
            let d = sel.select(disk, &disks).map_err(|e| refuse(e.to_string()))?;
            check_fits(d, img.raw_size).map_err(|e| refuse(e.to_string()))?;
        }
        let (image, disk) = (image.to_owned(), disk.to_owned());
        let updated = self
            .update_machine(&m.id, move |r| {
                match r.install.state {
                    InstallState::Writing | InstallState::Resetting => {
                        return Err(FleetError::Install {
                            id: r.id.clone(),
                            reason: format!("its install is {}; wait for it", r.install.state.as_str()),
                        })
                    }
                    InstallState::Installed => {
                        return Err(FleetError::Install {
                            id: r.id.clone(),
                            reason: format!(
                                "is installed ({} on {}); `muster machine reset --wipe` it first",
                                r.install.image, r.install.device
                            ),
                        })
                    }
                    _ => {}
                }
                r.install = crate::store::InstallRecord {
                    state: InstallState::Requested,
                    image,
                    disk,
                    updated_ms: muster_util::now_ms(),
                    ..Default::default()
                };
                Ok(())
            })
            .await?;
        if let Some(msg) = self.install_msg(&updated) {
            self.push(&updated.id, msg);
        }
        tracing::info!(machine = %updated.id, image = %updated.install.image, disk = %updated.install.disk, "install to disk requested");
        Ok(updated)
    }

    /// `muster machine reset`: the agent wipes the install (or with `wipe: false` only
    /// forgets it), reboots and network-boots; the record is removed when it reports.
    pub async fn reset(&self, query: &str, wipe: bool) -> Result<MachineRecord, FleetError> {
        let m = self.resolve(query)?;
        let updated = self
            .update_machine(&m.id, move |r| {
                match r.install.state {
                    InstallState::Installed | InstallState::Resetting => {}
                    InstallState::None => {
                        return Err(FleetError::Install {
                            id: r.id.clone(),
                            reason: "has no install to reset".into(),
                        })
                    }
                    other => {
                        return Err(FleetError::Install {
                            id: r.id.clone(),
                            reason: format!(
                                "its install is {} (not installed): nothing on the disk to reset",
                                other.as_str()
                            ),
                        })
                    }
                }
                r.install.state = InstallState::Resetting;
                r.install.wipe = wipe;
                r.install.updated_ms = muster_util::now_ms();
                Ok(())
            })
            .await?;
        if let Some(msg) = self.install_msg(&updated) {
            self.push(&updated.id, msg);
        }
        tracing::info!(machine = %updated.id, wipe, device = %updated.install.device, "reset requested");
        Ok(updated)
    }

    /// What a connected agent is told about its install, if anything.
    pub(super) fn install_msg(&self, m: &MachineRecord) -> Option<pb::ControllerMessage> {
        use pb::controller_message::Msg;
        match m.install.state {
            InstallState::Requested | InstallState::Writing if m.approved && !m.revoked => {
                let images = self.inner.images.get()?;
                let img = self.image(&m.install.image).ok()?;
                Some(pb::ControllerMessage {
                    msg: Some(Msg::Install(pb::Install {
                        image: img.name.clone(),
                        url: format!("{}/images/{}", images.base_url.trim_end_matches('/'), img.file),
                        size: img.size,
                        sha256: img.sha256,
                        raw_size: img.raw_size,
                        raw_sha256: img.raw_sha256,
                        disk: m.install.disk.clone(),
                    })),
                })
            }
            InstallState::Resetting => Some(pb::ControllerMessage {
                msg: Some(Msg::Reset(pb::Reset { wipe: m.install.wipe, disk: m.install.device.clone() })),
            }),
            _ => None,
        }
    }

    /// The agent's report on an install or reset.
    pub async fn on_install_status(&self, id: &MachineId, st: pb::InstallStatus) -> Result<(), FleetError> {
        let clip = |s: &str| {
            let mut s = s.to_owned();
            super::session::clip_to(&mut s, 512);
            s
        };
        // Debug formatting: what the node says is escaped in the log.
        tracing::info!(machine = %id, phase = ?clip(&st.phase), disk = ?clip(&st.disk), error = ?clip(&st.error), "install status");
        if st.phase == "reset" {
            // The disk is wiped and the machine reboots into network boot: it is a new machine
            // now (its registration, if it had one, is there for it again).
            let m = self.machine(id).ok_or_else(|| FleetError::NotFound(format!("no machine {id}")))?;
            if m.install.state != InstallState::Resetting {
                return Err(FleetError::Install {
                    id: id.clone(),
                    reason: "reported a reset nobody asked for".into(),
                });
            }
            let regs = self.store().list_registrations().await?;
            for mut r in regs.into_iter().filter(|r| r.claimed_by == id.to_string()) {
                r.claimed_by.clear();
                r.claimed_ms = 0;
                self.store().put_registration(r).await?;
            }
            self.store().delete_machine(id).await?;
            let why = FleetError::Unadmitted { id: id.clone(), why: super::Unadmitted::Deleted };
            self.close_session(id, Status::permission_denied(why.to_string()));
            self.live().remove(id);
            tracing::info!(machine = %id, "reset: the machine's disk is wiped and its record removed");
            return Ok(());
        }
        let phase = st.phase.clone();
        self.update_machine(id, move |r| {
            if r.install.state == InstallState::Resetting && phase == "failed" {
                // The reset did not happen: the install stands, with why.
                r.install.state = InstallState::Installed;
                r.install.error = clip(&st.error);
                r.install.updated_ms = muster_util::now_ms();
                return Ok(());
            }
            let state = match phase.as_str() {
                "writing" => InstallState::Writing,
                "installed" => InstallState::Installed,
                "failed" => InstallState::Failed,
                other => {
                    return Err(FleetError::invalid(
                        "install_status.phase",
                        format!("{other:?} is not a phase"),
                    ))
                }
            };
            if !st.image.is_empty() && st.image != r.install.image {
                return Err(FleetError::Install {
                    id: r.id.clone(),
                    reason: format!(
                        "reported on image {:?} while {:?} is asked for",
                        clip(&st.image),
                        r.install.image
                    ),
                });
            }
            if !matches!(r.install.state, InstallState::Requested | InstallState::Writing) {
                return Err(FleetError::Install {
                    id: r.id.clone(),
                    reason: format!(
                        "reported install {phase} while its install is {}",
                        r.install.state.as_str()
                    ),
                });
            }
            r.install.state = state;
            r.install.device = clip(&st.disk);
            r.install.error = clip(&st.error);
            r.install.download_ms = st.download_ms;
            r.install.write_ms = st.write_ms;
            r.install.verify_ms = st.verify_ms;
            r.install.updated_ms = muster_util::now_ms();
            Ok(())
        })
        .await?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ring::digest;

    #[test]
    fn images_are_added_with_both_digests_and_listed() {
        let d = tempfile::tempdir().unwrap();
        let raw = d.path().join("disk.raw");
        let mut data = vec![0u8; 3 << 20];
        data[10] = 7;
        std::fs::write(&raw, &data).unwrap();
        let dir = d.path().join("images");
        let m = add_image(&dir, &raw, "bookworm", 5).unwrap();
        assert_eq!(m.raw_size, 3 << 20);
        assert_eq!(m.raw_sha256, hex::encode(digest::digest(&digest::SHA256, &data)));
        let served = std::fs::read(dir.join("bookworm.raw.gz")).unwrap();
        assert_eq!(m.sha256, hex::encode(digest::digest(&digest::SHA256, &served)));
        // The gzip'd file added again gives the same raw digest.
        let again = add_image(&dir, &dir.join("bookworm.raw.gz"), "copy", 6).unwrap();
        assert_eq!(again.raw_sha256, m.raw_sha256);
        assert_eq!(
            list_images(&dir).unwrap().iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            ["bookworm", "copy"]
        );
        assert!(matches!(add_image(&dir, &raw, "../x", 1), Err(ImageError::Name(_))));
        std::fs::write(d.path().join("tiny"), b"x").unwrap();
        assert!(matches!(add_image(&dir, &d.path().join("tiny"), "tiny", 1), Err(ImageError::Invalid(_))));
        assert!(!dir.join("tiny.raw.gz").exists());
    }
}
