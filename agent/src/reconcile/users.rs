//! Local users: `/etc/passwd`, `/etc/group`, `/etc/shadow` (password locked) and SSH
//! authorized keys, all under the effects' root.
//!
//! Users Muster creates carry [`GECOS`] in their passwd entry; one of those no longer in the
//! config is removed again ([`prune`]), with its primary group, its group memberships, its
//! shadow entry and its keys. Users that existed before Muster are never removed.

use muster_machinery::config::{MachineConfig, User};

use super::files::ensure_file;
use super::{text, Found, Pass, Resource};
use crate::effects::Effects;

pub(crate) struct Users;

/// The account files.
const ACCOUNT_FILES: [&str; 3] = ["/etc/passwd", "/etc/group", "/etc/shadow"];

/// The passwd comment (GECOS) of the users Muster creates.
pub(crate) const GECOS: &str = "managed by muster";

impl Resource for Users {
    type Want = User;
    /// The account files are read (and written) as one step: see [`user`].
    type Have = ();

    fn desired(cfg: &MachineConfig) -> Vec<(String, Result<User, String>)> {
        cfg.users.iter().map(|u| (format!("user:{}", u.name), Ok(u.clone()))).collect()
    }

    fn observe(_: &dyn Effects, _: &User) -> Result<(), String> {
        Ok(())
    }

    fn converge(fx: &dyn Effects, u: &User, (): (), pass: &Pass<'_>) -> Result<Found, String> {
        let report_only = pass.report_only;
        user(fx, u, report_only)
    }

    fn claims(_: &dyn Effects, u: &User) -> Vec<String> {
        let mut v: Vec<String> = ACCOUNT_FILES.iter().map(|f| format!("file:{f}")).collect();
        if !u.ssh_authorized_keys.is_empty() {
            v.push(format!("file:/home/{}/.ssh/authorized_keys", u.name));
        }
        v
    }
}

/// Whether a passwd, group or shadow line is `name`'s entry.
fn entry_of(name: &str) -> impl Fn(&String) -> bool + '_ {
    move |l| l.split(':').next() == Some(name)
}

/// A local account: `/etc/passwd`, `/etc/group`, `/etc/shadow` (password locked) and the SSH
/// authorized keys, all under the effects' root.
fn user(fx: &dyn Effects, u: &User, report_only: bool) -> Result<Found, String> {
    let e = text;
    // Each file keeps its mode and owner (Debian's shadow is root:shadow 0640); new ones are
    // root's, and shadow is private.
    let read = |p: &str, new_mode: u32| -> Result<(String, u32, (u32, u32)), String> {
        Ok(fx
            .read_file(p)
            .map_err(e)?
            .filter(|f| f.mode != 0)
            .map_or((String::new(), new_mode, (0, 0)), |f| {
                (String::from_utf8_lossy(&f.content).into_owned(), f.mode, (f.uid, f.gid))
            }))
    };
    let (passwd, passwd_mode, passwd_owner) = read("/etc/passwd", 0o644)?;
    let (group, group_mode, group_owner) = read("/etc/group", 0o644)?;
    let (shadow, shadow_mode, shadow_owner) = read("/etc/shadow", 0o600)?;
    let fields = |l: &str| l.split(':').map(str::to_owned).collect::<Vec<_>>();
    let ids =
        |text: &str| -> Vec<u32> { text.lines().filter_map(|l| l.split(':').nth(2)?.parse().ok()).collect() };
    let next_free = |taken: &[u32]| (1000..60000).find(|i| !taken.contains(i)).unwrap_or(60000);

    let mut p_lines: Vec<String> = passwd.lines().map(str::to_owned).collect();
    let mut g_lines: Vec<String> = group.lines().map(str::to_owned).collect();
    let mut s_lines: Vec<String> = shadow.lines().map(str::to_owned).collect();
    let shell = u.shell.clone().unwrap_or_else(|| "/bin/sh".into());
    let home = format!("/home/{}", u.name);

    // The primary group, named after the user.
    let gid = match g_lines.iter().find(|l| entry_of(&u.name)(l)).map(|l| fields(l)) {
        Some(f) => f
            .get(2)
            .and_then(|g| g.parse().ok())
            .ok_or_else(|| format!("/etc/group: bad entry for {}", u.name))?,
        None => {
            let taken = ids(&group);
            let gid = u.uid.filter(|id| !taken.contains(id)).unwrap_or_else(|| next_free(&taken));
            g_lines.push(format!("{}:x:{gid}:", u.name));
            gid
        }
    };
    let uid = match p_lines.iter().position(entry_of(&u.name)) {
        Some(i) => {
            let mut f = fields(&p_lines[i]);
            f.resize(7, String::new());
            let have_uid: u32 = f[2].parse().map_err(|_| format!("/etc/passwd: bad uid for {}", u.name))?;
            let uid = u.uid.unwrap_or(have_uid);
            if u.shell.is_some() {
                f[6].clone_from(&shell);
            }
            f[2] = uid.to_string();
            p_lines[i] = f.join(":");
            uid
        }
        None => {
            let taken = ids(&passwd);
            if let Some(id) = u.uid.filter(|id| taken.contains(id)) {
                return Err(format!("uid {id} is already taken in /etc/passwd"));
            }
            let uid = u.uid.unwrap_or_else(|| next_free(&taken));
            p_lines.push(format!("{}:x:{uid}:{gid}:{GECOS}:{home}:{shell}", u.name));
            uid
        }
    };
    if !s_lines.iter().any(entry_of(&u.name)) {
        s_lines.push(format!("{}:!::0:99999:7:::", u.name));
    }
    for g in &u.groups {
        let i = g_lines
            .iter()
            .position(entry_of(g))
            .ok_or_else(|| format!("group {g} does not exist on this node"))?;
        let mut f = fields(&g_lines[i]);
        f.resize(4, String::new());
        let mut members: Vec<String> = f[3].split(',').filter(|m| !m.is_empty()).map(str::to_owned).collect();
        if !members.contains(&u.name) {
            members.push(u.name.clone());
            f[3] = members.join(",");
            g_lines[i] = f.join(":");
        }
    }
    let text = |lines: Vec<String>| {
        let mut t = lines.join("\n");
        t.push('\n');
        t
    };
    let mut differs = false;
    for (path, lines, mode, owner) in [
        ("/etc/group", g_lines, group_mode, group_owner),
        ("/etc/passwd", p_lines, passwd_mode, passwd_owner),
        ("/etc/shadow", s_lines, shadow_mode, shadow_owner),
    ] {
        let found = ensure_file(fx, path, text(lines).as_bytes(), mode, owner, report_only)?;
        differs |= found.differs();
    }
    if !u.ssh_authorized_keys.is_empty() {
        let keys = text(u.ssh_authorized_keys.clone());
        let path = format!("{home}/.ssh/authorized_keys");
        let found = ensure_file(fx, &path, keys.as_bytes(), 0o600, (uid, gid), report_only)?;
        differs |= found.differs();
    }
    Ok(Found::from(differs))
}

/// Removes the users Muster created (their passwd comment is [`GECOS`]) that `cfg` no longer
/// declares: passwd, shadow, their primary group (named after them, when no one else's),
/// their memberships, and their authorized keys. Each is reported as `user:NAME` restored.
pub(crate) fn prune(cfg: &MachineConfig, fx: &dyn Effects, pass: &Pass<'_>, report: &mut super::Report) {
    let r = (|| -> Result<Vec<String>, String> {
        let Some(passwd) = fx.read_file("/etc/passwd").map_err(text)? else { return Ok(Vec::new()) };
        let passwd = String::from_utf8_lossy(&passwd.content).into_owned();
        let gone: Vec<(String, String)> = passwd
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() >= 5 && f[4] == GECOS && !cfg.users.iter().any(|u| u.name == f[0]))
                    .then(|| (f[0].to_owned(), f[3].to_owned()))
            })
            .collect();
        if gone.is_empty() || pass.report_only {
            return Ok(gone.into_iter().map(|(n, _)| n).collect());
        }
        let names: Vec<&str> = gone.iter().map(|(n, _)| n.as_str()).collect();
        let keep_line = |l: &&str| !names.contains(&l.split(':').next().unwrap_or_default());
        // Primary groups named after a removed user, unless someone else still has them.
        let still_used: Vec<String> =
            passwd.lines().filter(keep_line).filter_map(|l| l.split(':').nth(3).map(str::to_owned)).collect();
        let rewrite = |path: &str, edit: &dyn Fn(&str) -> Option<String>| -> Result<(), String> {
            let Some(f) = fx.read_file(path).map_err(text)? else { return Ok(()) };
            let text_in = String::from_utf8_lossy(&f.content).into_owned();
            let mut out: Vec<String> = text_in.lines().filter_map(edit).collect();
            let mut body = out.join("\n");
            if !out.is_empty() {
                body.push('\n');
            }
            out.clear();
            ensure_file(fx, path, body.as_bytes(), f.mode, (f.uid, f.gid), false).map(|_| ())
        };
        rewrite("/etc/passwd", &|l| keep_line(&l).then(|| l.to_owned()))?;
        rewrite("/etc/shadow", &|l| keep_line(&l).then(|| l.to_owned()))?;
        rewrite("/etc/group", &|l| {
            let mut f: Vec<String> = l.split(':').map(str::to_owned).collect();
            if f.len() >= 3 && names.contains(&f[0].as_str()) && !still_used.contains(&f[2]) {
                return None;
            }
            if f.len() >= 4 {
                let members: Vec<&str> =
                    f[3].split(',').filter(|m| !m.is_empty() && !names.contains(m)).collect();
                f[3] = members.join(",");
            }
            Some(f.join(":"))
        })?;
        for n in &names {
            fx.remove_file(&format!("/home/{n}/.ssh/authorized_keys")).map_err(text)?;
        }
        Ok(names.iter().map(|n| (*n).to_owned()).collect())
    })();
    match r {
        Ok(names) => {
            for n in names {
                let outcome =
                    if pass.report_only { Ok(super::Found::Differs) } else { Ok(super::Found::Same) };
                if pass.report_only {
                    report.record(format!("user:{n}"), outcome, true);
                } else {
                    report.restored(format!("user:{n}"), Ok(true));
                }
            }
        }
        Err(e) => report.record("users".into(), Err(e), pass.report_only),
    }
}
