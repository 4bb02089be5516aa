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
    // An empty component is a `//`, a trailing `/` or the root itself.
    if p.split('/').skip(1).any(|c| c.is_empty() || c == "." || c == "..") {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    /// Validates a config made of `fields` (camelCase, as in YAML) on top of apiVersion/kind.
    fn check(fields: Value) -> Validation {
        let mut doc = json!({"apiVersion": API_VERSION, "kind": KIND});
        doc.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        validate(&serde_json::from_value(doc).unwrap())
    }

    /// The paths of the errors of `fields`.
    fn error_paths(fields: Value) -> Vec<String> {
        check(fields).errors.into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn hostname_lengths_and_characters() {
        let label63 = "a".repeat(63);
        let host253 = format!("{label63}.{label63}.{label63}.{}", "b".repeat(61));
        assert_eq!(host253.len(), 253);
        for ok in ["a", "node-a", "a-b.c0.example", "Node-A", "0", label63.as_str(), host253.as_str()] {
            assert_eq!(ok.parse::<Hostname>().map(|h| h.as_str().to_owned()), Ok(ok.to_owned()), "{ok}");
        }
        let host254 = format!("{host253}b");
        let label64 = "a".repeat(64);
        for bad in ["", "-a", "a-", "a.-b", "a.b-", "a_b", "a b", "a..b", ".a", "a.", "é", &host254, &label64]
        {
            assert!(bad.parse::<Hostname>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cidr_prefix_is_at_most_the_address_length() {
        for ok in ["10.0.0.1/0", "10.0.0.1/32", "fd00::1/128", "fd00::1/33"] {
            assert!(ok.parse::<IpCidr>().is_ok(), "{ok}");
        }
        for bad in ["10.0.0.1/33", "fd00::1/129", "10.0.0.1", "10.0.0.1/x", "x/24"] {
            assert!(bad.parse::<IpCidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn file_mode_is_one_to_four_octal_digits() {
        assert_eq!("7".parse::<FileMode>(), Ok(FileMode(0o7)));
        assert_eq!("4755".parse::<FileMode>(), Ok(FileMode(0o4755)));
        for bad in ["", "00644", "12345", "0648", "-644", "+644", "0o64"] {
            assert!(bad.parse::<FileMode>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn owners_are_account_names_or_ids() {
        let name32 = "a".repeat(32);
        for ok in ["root", "_apt", "deploy-bot_1", "1000", "1000:1000", "root:adm", name32.as_str()] {
            assert!(ok.parse::<Owner>().is_ok(), "{ok}");
        }
        let name33 = "a".repeat(33);
        for bad in
            ["", ":", "root:", ":root", "Root", "aB", "9abc", "-ab", "a b", "a.b", "a:b:c", name33.as_str()]
        {
            assert!(bad.parse::<Owner>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn file_paths_must_be_absolute_normalised_and_outside_the_kernels_filesystems() {
        let file = |path: &str| json!({"files": [{"path": path, "content": "x"}]});
        let long_ok = format!("/{}", "a".repeat(4095));
        for ok in ["/etc/motd", "/a/.b", "/a/..b", "/processes", "/devices/x", long_ok.as_str()] {
            assert_eq!(error_paths(file(ok)), Vec::<String>::new(), "{ok}");
        }
        let too_long = format!("/{}", "a".repeat(4096));
        for bad in [
            "etc/motd",
            "/",
            "/etc/",
            "/etc//motd",
            "/etc/./motd",
            "/etc/../shadow",
            "/..",
            "/a\0b",
            "/proc",
            "/sys/kernel/x",
            "/dev/sda",
            too_long.as_str(),
        ] {
            assert_eq!(error_paths(file(bad)), ["files[0].path"], "{bad:?}");
        }
    }

    #[test]
    fn sysctl_names_and_values() {
        for ok in ["net.ipv4.ip_forward", "net/ipv4/conf/eth0/rp_filter", "net.ipv4.conf.*.x", "kernel.a-b"] {
            assert_eq!(error_paths(json!({"sysctls": {ok: "1"}})), Vec::<String>::new(), "{ok}");
        }
        for bad in ["", "net..x", ".net", "net.", "net.ipv4.a b", "net.ipv4.a=1", "net/../x"] {
            assert_eq!(error_paths(json!({"sysctls": {bad: "1"}})), [format!("sysctls.{bad}")], "{bad:?}");
        }
        for bad in ["", "1\n2"] {
            let got = error_paths(json!({"sysctls": {"vm.swappiness": bad}}));
            assert_eq!(got, ["sysctls.vm.swappiness"], "{bad:?}");
        }
    }

    #[test]
    fn interfaces_by_name_or_mac_once_each() {
        let itf = |itf: Value| json!({"network": {"interfaces": [itf]}});
        let name15 = "e".repeat(15);
        for ok in [json!({"name": "eth0"}), json!({"name": name15}), json!({"mac": "52:54:00:00:00:01"})] {
            assert_eq!(error_paths(itf(ok.clone())), Vec::<String>::new(), "{ok}");
        }
        for bad in ["", "eth/0", "eth 0", &"e".repeat(16)] {
            let got = error_paths(itf(json!({"name": bad})));
            assert_eq!(got, ["network.interfaces[0].name"], "{bad:?}");
        }
        // The same MAC in another spelling is the same interface.
        let twice = json!({"network": {"interfaces": [
            {"mac": "52:54:00:00:00:01", "mtu": 1500},
            {"mac": "52-54-00-00-00-01", "mtu": 68},
            {"name": "eth0", "mtu": 65535},
            {"name": "eth0"},
        ]}});
        assert_eq!(error_paths(twice), ["network.interfaces[1].mac", "network.interfaces[3].name"]);
    }

    #[test]
    fn dhcp_with_static_addresses_warns() {
        let warnings = |itf: Value| check(json!({"network": {"interfaces": [itf]}})).warnings;
        assert_eq!(warnings(json!({"name": "eth0", "dhcp": true})), Vec::<String>::new());
        assert_eq!(warnings(json!({"name": "eth0", "addresses": ["10.0.0.2/24"]})), Vec::<String>::new());
        assert_eq!(
            warnings(json!({"name": "eth0", "dhcp": false, "addresses": ["10.0.0.2/24"]})),
            Vec::<String>::new()
        );
        let w = warnings(json!({"name": "eth0", "dhcp": true, "addresses": ["10.0.0.2/24"]}));
        assert_eq!(w, ["network.interfaces[0] has both dhcp and static addresses"]);
    }

    #[test]
    fn kernel_module_names_and_parameters() {
        let module =
            |name: &str, params: &[&str]| json!({"kernelModules": [{"name": name, "parameters": params}]});
        assert_eq!(error_paths(module("br_netfilter", &["a=1", "b=x,y", "c="])), Vec::<String>::new());
        assert_eq!(error_paths(module("nf-conntrack", &[])), Vec::<String>::new());
        for bad in ["", "br.netfilter", "a b", "../x"] {
            assert_eq!(error_paths(module(bad, &[])), ["kernelModules[0].name"], "{bad:?}");
        }
        for bad in ["a", "a=1 b=2", "a=\t1"] {
            assert_eq!(error_paths(module("m", &[bad])), ["kernelModules[0].parameters[0]"], "{bad:?}");
        }
    }

    #[test]
    fn user_names_and_ssh_keys() {
        let user = |name: &str, keys: &[&str]| json!({"users": [{"name": name, "sshAuthorizedKeys": keys}]});
        let keys = [
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE user@host",
            "ecdsa-sha2-nistp256 AAAAE2VjZHNh",
            "sk-ssh-ed25519@openssh.com AAAAGnNr",
        ];
        assert_eq!(error_paths(user("admin", &keys)), Vec::<String>::new());
        for bad in ["", "Admin", "1000", "9ops", "a:b"] {
            assert_eq!(error_paths(user(bad, &[])), ["users[0].name"], "{bad:?}");
        }
        for bad in ["ssh-ed25519", "rsa AAAA", "AAAA ssh-ed25519", "ssh-ed25519 AAAA\nssh-rsa BBBB", ""] {
            assert_eq!(error_paths(user("admin", &[bad])), ["users[0].sshAuthorizedKeys[0]"], "{bad:?}");
        }
    }

    #[test]
    fn unit_names_need_a_name_and_a_unit_type() {
        let unit = |name: &str| json!({"units": [{"name": name}]});
        for ok in ["k3s.service", "a.timer", "b.socket", "c.mount", "d.target", "e.path"] {
            assert_eq!(error_paths(unit(ok)), Vec::<String>::new(), "{ok}");
        }
        for bad in [".service", "k3s", "k3s-agent", "k3s.services", "a/b.service", "service"] {
            assert_eq!(error_paths(unit(bad)), ["units[0].name"], "{bad:?}");
        }
    }

    #[test]
    fn field_errors_print_with_their_path() {
        let e = FieldError { path: "files[1].mode".into(), message: "bad".into() };
        assert_eq!(e.to_string(), "files[1].mode: bad");
        assert_eq!(FieldError { path: String::new(), message: "bad".into() }.to_string(), "bad");
    }
}
