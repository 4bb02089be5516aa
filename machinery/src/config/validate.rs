//! Validation: every error with its field path, plus warnings. The newtypes here ([`Hostname`],
//! [`IpCidr`], [`FileMode`], [`Owner`]) are how the agent holds these values once validated.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use base64::Engine;

use super::{MachineConfig, Route, API_VERSION, KIND};
use crate::model::{normalize_mac, validate_label};

/// One problem, at one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// e.g. `files[1].mode`; empty for the document itself.
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// What validation found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validation {
    pub errors: Vec<FieldError>,
    pub warnings: Vec<String>,
}

/// A hostname: RFC 1123 labels of 1-63 letters, digits and '-', at most 253 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Hostname(String);

impl FromStr for Hostname {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 253 {
            return Err("must be 1-253 characters".into());
        }
        for label in s.split('.') {
            let b = label.as_bytes();
            if label.is_empty() || label.len() > 63 {
                return Err(format!("label {label:?} must be 1-63 characters"));
            }
            if !b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
                || b[0] == b'-'
                || b[b.len() - 1] == b'-'
            {
                return Err(format!(
                    "label {label:?} may hold only letters, digits and '-', not at either end"
                ));
            }
        }
        Ok(Self(s.to_owned()))
    }
}

impl Hostname {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An address with its prefix length, e.g. `192.168.5.20/24` or `fd00::1/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpCidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for IpCidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').ok_or_else(|| format!("{s:?} must be ADDRESS/PREFIX"))?;
        let addr: IpAddr = a.parse().map_err(|_| format!("{a:?} is not an IP address"))?;
        let prefix: u8 = p.parse().map_err(|_| format!("prefix {p:?} is not a number"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("prefix /{prefix} is longer than {max}"));
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A file mode given as an octal string ("0644", "755").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileMode(pub u32);

impl FromStr for FileMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return Err(format!("{s:?} must be an octal mode such as \"0644\""));
        }
        u32::from_str_radix(s, 8).map(FileMode).map_err(|e| e.to_string())
    }
}

/// A file owner: `user`, `user:group`, `uid`, or `uid:gid`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    pub user: String,
    pub group: Option<String>,
}

fn account_name_ok(s: &str) -> bool {
    let b = s.as_bytes();
    !s.is_empty()
        && s.len() <= 32
        && (b.iter().all(u8::is_ascii_digit)
            || ((b[0].is_ascii_lowercase() || b[0] == b'_')
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-'))))
}

impl FromStr for Owner {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (user, group) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        if !account_name_ok(user) || group.is_some_and(|g| !account_name_ok(g)) {
            return Err(format!("{s:?} must be user, user:group, uid or uid:gid"));
        }
        Ok(Self { user: user.to_owned(), group: group.map(str::to_owned) })
    }
}

struct Checker {
    v: Validation,
}

impl Checker {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.v.errors.push(FieldError { path: path.into(), message: message.into() });
    }
    fn check<T: FromStr<Err = String>>(&mut self, path: impl Into<String>, s: &str) -> Option<T> {
        match s.parse::<T>() {
            Ok(v) => Some(v),
            Err(e) => {
                self.err(path, e);
                None
            }
        }
    }
    fn routes(&mut self, base: &str, routes: &[Route]) {
        for (k, r) in routes.iter().enumerate() {
            let to = self.check::<IpCidr>(format!("{base}.routes[{k}].to"), &r.to);
            if let Some(via) = &r.via {
                match via.parse::<IpAddr>() {
                    Ok(gw) => {
                        if to.is_some_and(|t| t.addr.is_ipv4() != gw.is_ipv4()) {
                            self.err(
                                format!("{base}.routes[{k}].via"),
                                "gateway and destination are of different IP families",
                            );
                        }
                    }
                    Err(_) => {
                        self.err(format!("{base}.routes[{k}].via"), format!("{via:?} is not an IP address"))
                    }
                }
            }
        }
    }
}

/// Absolute, normalised, not into the kernel's virtual filesystems.
fn check_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err("must be an absolute path".into());
    }
    if p.len() > 4096 || p.contains('\0') {
        return Err("is not a usable path".into());
    }
    if p == "/" || p.ends_with('/') || p.split('/').skip(1).any(|c| c.is_empty() || c == "." || c == "..") {
        return Err("must be a normalised file path (no '.', '..', '//' or trailing '/')".into());
    }
    if ["/proc", "/sys", "/dev"].iter().any(|d| p == *d || p.starts_with(&format!("{d}/"))) {
        return Err("must not be under /proc, /sys or /dev (use sysctls or kernelModules)".into());
    }
    Ok(())
}

/// Checks a config; returns every error (with its path) and warning.
pub fn validate(c: &MachineConfig) -> Validation {
    let mut ck = Checker { v: Validation::default() };
    if c.api_version != API_VERSION {
        ck.err("apiVersion", format!("must be {API_VERSION}, not {:?}", c.api_version));
    }
    if c.kind != KIND {
        ck.err("kind", format!("must be {KIND}, not {:?}", c.kind));
    }
    if let Some(h) = &c.hostname {
        if ck.check::<Hostname>("hostname", h).is_some() && h.bytes().any(|b| b.is_ascii_uppercase()) {
            ck.v.warnings.push(format!(
                "hostname {h:?} has uppercase letters; Kubernetes node names will be lowercased"
            ));
        }
    }
    let mut paths = BTreeSet::new();
    for (i, f) in c.files.iter().enumerate() {
        let at = |field: &str| format!("files[{i}].{field}");
        if let Err(e) = check_path(&f.path) {
            ck.err(at("path"), e);
        } else if !paths.insert(f.path.as_str()) {
            ck.err(at("path"), format!("{} is listed twice", f.path));
        }
        match (&f.content, &f.content_base64) {
            (Some(_), Some(_)) => ck.err(at("content"), "give content or contentBase64, not both"),
            (None, None) => ck.err(at("content"), "content or contentBase64 is required"),
            (None, Some(b)) => {
                if base64::engine::general_purpose::STANDARD.decode(b).is_err() {
                    ck.err(at("contentBase64"), "is not valid base64");
                }
            }
            (Some(_), None) => {}
        }
        if let Some(m) = &f.mode {
            if let Some(FileMode(mode)) = ck.check::<FileMode>(at("mode"), m) {
                if mode & 0o002 != 0 {
                    ck.v.warnings.push(format!("files[{i}] ({}) is world-writable ({m})", f.path));
                }
            }
        }
        if let Some(o) = &f.owner {
            ck.check::<Owner>(at("owner"), o);
        }
    }
    for (k, v) in &c.sysctls {
        let key_ok = !k.is_empty()
            && k.split(['.', '/']).all(|p| {
                !p.is_empty()
                    && p != ".."
                    && p.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'*'))
            });
        if !key_ok {
            ck.err(format!("sysctls.{k}"), "is not a sysctl name such as net.ipv4.ip_forward");
        }
        if v.is_empty() || v.contains('\n') {
            ck.err(format!("sysctls.{k}"), "value must be one non-empty line");
        }
    }
    if let Some(n) = &c.network {
        let mut seen = BTreeSet::new();
        for (i, itf) in n.interfaces.iter().enumerate() {
            let base = format!("network.interfaces[{i}]");
            match (&itf.name, &itf.mac) {
                (Some(_), Some(_)) => ck.err(&base, "match by name or by mac, not both"),
                (None, None) => ck.err(&base, "name or mac is required"),
                (Some(name), None) => {
                    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                        ck.err(format!("{base}.name"), "must be an interface name of 1-15 characters");
                    } else if !seen.insert(name.clone()) {
                        ck.err(format!("{base}.name"), format!("{name} is listed twice"));
                    }
                }
                (None, Some(mac)) => match normalize_mac(mac) {
                    Some(m) => {
                        if !seen.insert(m.clone()) {
                            ck.err(format!("{base}.mac"), format!("{m} is listed twice"));
                        }
                    }
                    None => ck.err(format!("{base}.mac"), format!("{mac:?} is not a MAC address")),
                },
            }
            for (j, a) in itf.addresses.iter().enumerate() {
                ck.check::<IpCidr>(format!("{base}.addresses[{j}]"), a);
            }
            ck.routes(&base, &itf.routes);
            if let Some(mtu) = itf.mtu {
                if !(68..=65535).contains(&mtu) {
                    ck.err(format!("{base}.mtu"), "must be between 68 and 65535");
                }
            }
            for (j, vlan) in itf.vlans.iter().enumerate() {
                let vb = format!("{base}.vlans[{j}]");
                if !(1..=4094).contains(&vlan.id) {
                    ck.err(format!("{vb}.id"), "must be between 1 and 4094");
                }
                for (k, a) in vlan.addresses.iter().enumerate() {
                    ck.check::<IpCidr>(format!("{vb}.addresses[{k}]"), a);
                }
                ck.routes(&vb, &vlan.routes);
            }
            if itf.dhcp == Some(true) && !itf.addresses.is_empty() {
                ck.v.warnings.push(format!("{base} has both dhcp and static addresses"));
            }
        }
        for (i, ns) in n.nameservers.iter().enumerate() {
            if ns.parse::<IpAddr>().is_err() {
                ck.err(format!("network.nameservers[{i}]"), format!("{ns:?} is not an IP address"));
            }
        }
        for (i, d) in n.search_domains.iter().enumerate() {
            ck.check::<Hostname>(format!("network.searchDomains[{i}]"), d);
        }
    }
    for (i, m) in c.kernel_modules.iter().enumerate() {
        if m.name.is_empty() || !m.name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
        {
            ck.err(format!("kernelModules[{i}].name"), "must be a module name such as br_netfilter");
        }
        for (j, p) in m.parameters.iter().enumerate() {
            if !p.contains('=') || p.contains(char::is_whitespace) {
                ck.err(format!("kernelModules[{i}].parameters[{j}]"), "must be key=value");
            }
        }
    }
    let mut users = BTreeSet::new();
    for (i, u) in c.users.iter().enumerate() {
        if !account_name_ok(&u.name) || u.name.bytes().all(|b| b.is_ascii_digit()) {
            ck.err(format!("users[{i}].name"), "must be a user name such as admin");
        } else if !users.insert(u.name.as_str()) {
            ck.err(format!("users[{i}].name"), format!("{} is listed twice", u.name));
        }
        for (j, k) in u.ssh_authorized_keys.iter().enumerate() {
            let kind = k.split_whitespace().next().unwrap_or_default();
            let known = kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-");
            if !known || k.split_whitespace().count() < 2 || k.contains('\n') {
                ck.err(format!("users[{i}].sshAuthorizedKeys[{j}]"), "is not an OpenSSH public key line");
            }
        }
    }
    for (i, u) in c.units.iter().enumerate() {
        let types = [".service", ".timer", ".socket", ".mount", ".target", ".path"];
        if !types.iter().any(|t| u.name.len() > t.len() && u.name.ends_with(t)) || u.name.contains('/') {
            ck.err(format!("units[{i}].name"), "must be a unit name such as k3s.service");
        }
    }
    for (i, t) in c.time_servers.iter().enumerate() {
        if t.parse::<IpAddr>().is_err() && t.parse::<Hostname>().is_err() {
            ck.err(format!("timeServers[{i}]"), format!("{t:?} is neither a hostname nor an IP address"));
        }
    }
    for (k, v) in &c.node_labels {
        if let Err(e) = validate_label(k, v) {
            ck.err(format!("nodeLabels.{k}"), e.to_string());
        }
    }
    ck.v
}
