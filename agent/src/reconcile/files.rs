//! Files with exactly their content, mode and owner; and [`ensure_file`], which every
//! reconciler that writes a file uses.

use base64::Engine;
use muster_machinery::config::{FileMode, MachineConfig, Owner};

use super::{text, Found, Pass, Resource};
use crate::effects::{Effects, FileState};

/// A file as a reconciler wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WantFile {
    pub path: String,
    pub content: Vec<u8>,
    pub mode: u32,
    /// `user[:group]` as the config says it; resolved on the node.
    pub owner: Owner,
}

pub(crate) struct Files;

impl Resource for Files {
    type Want = WantFile;
    type Have = Option<FileState>;

    fn desired(cfg: &MachineConfig) -> Vec<(String, Result<WantFile, String>)> {
        cfg.files
            .iter()
            .map(|f| {
                let want = (|| {
                    let content = match (&f.content, &f.content_base64) {
                        (Some(c), _) => c.as_bytes().to_vec(),
                        (None, Some(b)) => {
                            base64::engine::general_purpose::STANDARD.decode(b).map_err(|e| e.to_string())?
                        }
                        (None, None) => Vec::new(),
                    };
                    let mode = f.mode.as_deref().unwrap_or("0644").parse::<FileMode>()?.0;
                    let owner = f.owner.as_deref().unwrap_or("root").parse::<Owner>()?;
                    Ok(WantFile { path: f.path.clone(), content, mode, owner })
                })();
                (format!("file:{}", f.path), want)
            })
            .collect()
    }

    fn observe(fx: &dyn Effects, want: &WantFile) -> Result<Option<FileState>, String> {
        fx.read_file(&want.path).map_err(text)
    }

    fn converge(
        fx: &dyn Effects,
        want: &WantFile,
        have: Option<FileState>,
        pass: &Pass<'_>,
    ) -> Result<Found, String> {
        let report_only = pass.report_only;
        let ids = fx.resolve_owner(&want.owner.user, want.owner.group.as_deref()).map_err(text)?;
        write_if_differs(fx, &want.path, have, &want.content, want.mode, ids, report_only)
    }

    fn claims(_: &dyn Effects, want: &WantFile) -> Vec<String> {
        vec![format!("file:{}", want.path)]
    }
}

/// A file with exactly this content, mode and owner.
pub(crate) fn ensure_file(
    fx: &dyn Effects,
    path: &str,
    content: &[u8],
    mode: u32,
    owner: (u32, u32),
    report_only: bool,
) -> Result<Found, String> {
    let have = fx.read_file(path).map_err(text)?;
    write_if_differs(fx, path, have, content, mode, owner, report_only)
}

pub(crate) fn write_if_differs(
    fx: &dyn Effects,
    path: &str,
    have: Option<FileState>,
    content: &[u8],
    mode: u32,
    (uid, gid): (u32, u32),
    report_only: bool,
) -> Result<Found, String> {
    if have.as_ref().is_some_and(|h| h.content == content && h.mode == mode && h.uid == uid && h.gid == gid) {
        return Ok(Found::Same);
    }
    if !report_only {
        fx.write_file(path, content, mode, uid, gid).map_err(text)?;
    }
    Ok(Found::Differs)
}
