//! iPXE scripts and the per-machine boot request.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A MAC address; parses `52:54:00:12:34:56`, `52-54-…` and `525400123456`, shows lower-case
/// with colons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (like 52:54:00:12:34:56)")]
pub struct MacError(pub String);

impl FromStr for MacAddr {
    type Err = MacError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex: String = s.chars().filter(|c| !matches!(c, ':' | '-' | '.')).collect();
        if hex.len() != 12 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(MacError(s.to_owned()));
        }
        let mut out = [0u8; 6];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).map_err(|_| MacError(s.to_owned()))?;
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

/// What a machine says about itself when it asks for its boot script.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootRequest {
    pub mac: Option<MacAddr>,
    /// SMBIOS UUID, lower-case; `None` when the firmware has none (empty or all zeros).
    pub uuid: Option<String>,
    pub serial: Option<String>,
    /// iPXE's `${buildarch}`: i386, x86_64, arm64, …
    pub arch: Option<String>,
    pub remote: Option<IpAddr>,
}

/// A query parameter that is not acceptable; the message names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{param}: {problem}")]
pub struct QueryError {
    pub param: String,
    pub problem: String,
}

impl QueryError {
    fn new(param: &str, problem: impl Into<String>) -> Self {
        QueryError { param: param.to_owned(), problem: problem.into() }
    }
}

/// Decodes one `application/x-www-form-urlencoded` component (`%XX`, `+` for space); `param`
/// names it in the error.
fn url_decode(s: &str, param: &str) -> Result<String, QueryError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                let v = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
                match v {
                    Some(v) => out.push(v),
                    None => return Err(QueryError::new(param, "bad %-escape")),
                }
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| QueryError::new(param, "not UTF-8"))
}

/// Splits and URL-decodes a raw query string (`a=1&b=%3A`). A repeated parameter is refused.
pub fn parse_query(raw: &str) -> Result<HashMap<String, String>, QueryError> {
    let mut out = HashMap::new();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = url_decode(k, "query")?;
        let v = url_decode(v, &k)?;
        if out.contains_key(&k) {
            return Err(QueryError::new(&k, "given more than once"));
        }
        out.insert(k, v);
    }
    Ok(out)
}

impl BootRequest {
    /// From the raw (URL-encoded) query string of `/boot/machine.ipxe`.
    pub fn from_query_str(raw: &str, remote: Option<IpAddr>) -> Result<Self, QueryError> {
        Self::from_query(&parse_query(raw)?, remote)
    }

    /// From the (already URL-decoded) query of `/boot/machine.ipxe`. Unknown parameters are
    /// ignored; empty values are `None`.
    pub fn from_query(q: &HashMap<String, String>, remote: Option<IpAddr>) -> Result<Self, QueryError> {
        let text = |k: &'static str| -> Result<Option<String>, QueryError> {
            match q.get(k).map(|v| v.trim()) {
                None | Some("") => Ok(None),
                Some(v) if v.len() > 128 => Err(QueryError::new(k, "longer than 128 bytes")),
                Some(v) if v.chars().any(char::is_control) => {
                    Err(QueryError::new(k, "contains control characters"))
                }
                Some(v) => Ok(Some(v.to_owned())),
            }
        };
        let mac = text("mac")?
            .map(|m| m.parse::<MacAddr>().map_err(|e| QueryError::new("mac", e.to_string())))
            .transpose()?;
        let uuid = text("uuid")?.map(|u| u.to_ascii_lowercase()).filter(|u| {
            // All zeros (or all F) is what firmware without a UUID reports.
            let digits: String = u.chars().filter(|c| *c != '-').collect();
            !(digits.chars().all(|c| c == '0') || digits.chars().all(|c| c == 'f'))
        });
        if let Some(u) = &uuid {
            let hex = u.chars().filter(|c| *c != '-').count();
            if hex != 32 || !u.chars().all(|c| c == '-' || c.is_ascii_hexdigit()) {
                return Err(QueryError::new("uuid", format!("{u:?} is not a UUID")));
            }
        }
        let arch = text("arch")?;
        if let Some(a) = &arch {
            if !a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                return Err(QueryError::new("arch", format!("{a:?} is not an architecture name")));
            }
        }
        Ok(BootRequest { mac, uuid, serial: text("serial")?, arch, remote })
    }
}

/// What to boot. Its `Debug` (what logs show) hides the command line's secrets
/// ([`redact_cmdline`]).
#[derive(Clone, PartialEq, Eq)]
pub struct BootSpec {
    /// Why this machine gets this (e.g. `registered`, `discovery`), shown on its console.
    pub profile: String,
    /// Asset names (files in the assets directory), e.g. `vmlinuz`, `initramfs.img`.
    pub kernel: String,
    pub initrd: String,
    /// The kernel command line (`muster.controller=… muster.ca_hash=… muster.token=…`).
    pub cmdline: String,
}

impl fmt::Debug for BootSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootSpec")
            .field("profile", &self.profile)
            .field("kernel", &self.kernel)
            .field("initrd", &self.initrd)
            .field("cmdline", &redact_cmdline(&self.cmdline))
            .finish()
    }
}

/// What stands for a secret in a redacted command line.
pub const REDACTED: &str = "<redacted>";

/// Whether the kernel parameter `name` (e.g. `muster.token`) carries a secret: its last
/// `.`-separated part is, or ends in, `token`, `secret`, `password`, `passwd` or `key`.
fn secret_param(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name).to_ascii_lowercase();
    ["token", "secret", "password", "passwd"].iter().any(|s| last.ends_with(s))
        || last == "key"
        || last.ends_with("_key")
        || last.ends_with("-key")
}

/// A kernel command line for logs: the value of every parameter that carries a secret (see
/// [`BootSpec`]'s `Debug`) is replaced by `<redacted>`, except what precedes its first `.` — a
/// join token's public id (`muster.token=<id>.<secret>` → `muster.token=<id>.<redacted>`).
/// Parameters are split at whitespace and joined by single spaces.
pub fn redact_cmdline(cmdline: &str) -> String {
    cmdline
        .split_ascii_whitespace()
        .map(|word| match word.split_once('=') {
            Some((name, value)) if secret_param(name) => match value.split_once('.') {
                Some((id, _)) => format!("{name}={id}.{REDACTED}"),
                None => format!("{name}={REDACTED}"),
            },
            _ => word.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootAction {
    Boot(BootSpec),
    /// Do not network-boot: the script prints the reason and exits, so the firmware tries the
    /// next boot device (the local disk).
    Exit {
        reason: String,
    },
    /// Boot the first local disk from iPXE (`sanboot --no-describe --drive 0x80`; BIOS only,
    /// on UEFI it falls back to `exit`).
    LocalDisk {
        reason: String,
    },
}

/// A [`BootSpec`] that cannot be put into an iPXE script safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("boot spec {field}: {problem}")]
pub struct ScriptError {
    pub field: &'static str,
    pub problem: String,
}

/// The entry script: chains the per-machine script with what iPXE knows about the machine.
/// The path is absolute (host and port come from wherever this script was fetched): older
/// iPXE builds (Debian's 2019 `ipxe-qemu`) misparse a relative `machine.ipxe?mac=52:…` as a URI
/// scheme. The MAC goes as `hexhyp` (`52-54-00-…`), since `${net0/mac:uristring}` yields the raw
/// bytes there; the UUID is plain hex with hyphens and needs no escaping.
pub fn entry_script() -> String {
    "#!ipxe\n\
     echo Muster network boot: asking for this machine's script\n\
     chain /boot/machine.ipxe?mac=${net0/mac:hexhyp}&uuid=${uuid}&serial=${serial:uristring}&arch=${buildarch:uristring} || goto failed\n\
     exit\n\
     :failed\n\
     echo Muster: could not fetch the machine script; continuing with the next boot device\n\
     sleep 5\n\
     exit 1\n"
        .to_owned()
}

/// Something safe to put on an iPXE `echo` line (no expansion, no new lines).
fn echo_safe(s: &str) -> String {
    s.chars()
        .map(|c| if (c.is_ascii_graphic() || c == ' ') && c != '$' { c } else { '?' })
        .collect::<String>()
}

/// An argument iPXE takes literally: printable ASCII, no `${` expansion, no new lines.
fn check_words(field: &'static str, s: &str) -> Result<(), ScriptError> {
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
        return Err(ScriptError { field, problem: format!("contains {c:?}") });
    }
    if s.contains("${") {
        return Err(ScriptError { field, problem: "contains \"${\" (iPXE would expand it)".into() });
    }
    Ok(())
}

fn check_asset(field: &'static str, s: &str) -> Result<(), ScriptError> {
    if crate::Assets::valid_name(s) {
        Ok(())
    } else {
        Err(ScriptError { field, problem: format!("{s:?} is not an asset name") })
    }
}

/// The per-machine script for `action`. Assets are fetched from `/boot/assets/NAME` on the
/// same host and port as the script.
pub fn machine_script(action: &BootAction) -> Result<String, ScriptError> {
    Ok(match action {
        BootAction::Boot(b) => {
            check_asset("kernel", &b.kernel)?;
            check_asset("initrd", &b.initrd)?;
            check_words("cmdline", &b.cmdline)?;
            format!(
                "#!ipxe\n\
                 echo Muster: booting profile {profile}\n\
                 kernel /boot/assets/{kernel} initrd={initrd} {cmdline} || goto failed\n\
                 initrd /boot/assets/{initrd} || goto failed\n\
                 boot || goto failed\n\
                 :failed\n\
                 echo Muster: boot failed; continuing with the next boot device\n\
                 sleep 5\n\
                 exit 1\n",
                profile = echo_safe(&b.profile),
                kernel = b.kernel,
                initrd = b.initrd,
                cmdline = b.cmdline.trim(),
            )
        }
        BootAction::Exit { reason } => {
            format!("#!ipxe\necho Muster: not network-booting this machine: {}\nexit\n", echo_safe(reason))
        }
        BootAction::LocalDisk { reason } => format!(
            "#!ipxe\n\
             echo Muster: booting from the local disk: {}\n\
             sanboot --no-describe --drive 0x80 || goto failed\n\
             :failed\n\
             echo Muster: could not boot the local disk; continuing with the next boot device\n\
             exit\n",
            echo_safe(reason)
        ),
    })
}

/// A script that reports an error on the machine's console and goes on to the next device.
pub fn error_script(message: &str) -> String {
    format!("#!ipxe\necho Muster: {}\nsleep 5\nexit 1\n", echo_safe(message))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn mac_forms() {
        for s in ["52:54:00:12:34:56", "52-54-00-12-34-56", "525400123456", "52:54:00:12:34:56 "] {
            assert_eq!(s.trim().parse::<MacAddr>().unwrap().to_string(), "52:54:00:12:34:56", "{s}");
        }
        assert_eq!("52:54:00:AB:CD:EF".parse::<MacAddr>().unwrap().to_string(), "52:54:00:ab:cd:ef");
        for bad in ["", "52:54:00:12:34", "52:54:00:12:34:56:78", "zz:54:00:12:34:56", "52:54:00:12:34:5g"] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_what_ipxe_sends() {
        let r = BootRequest::from_query(
            &q(&[
                ("mac", "52:54:00:AB:cd:01"),
                ("uuid", "6D757374-6572-4000-8000-000000000001"),
                ("serial", "S1"),
                ("arch", "x86_64"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(r.mac.unwrap().to_string(), "52:54:00:ab:cd:01");
        assert_eq!(r.uuid.as_deref(), Some("6d757374-6572-4000-8000-000000000001"));
        assert_eq!((r.serial.as_deref(), r.arch.as_deref()), (Some("S1"), Some("x86_64")));
    }

    #[test]
    fn url_encoded_query() {
        let remote = Some(IpAddr::from([10, 0, 2, 15]));
        let r = BootRequest::from_query_str(
            "mac=52%3A54%3A00%3A12%3A34%3A56&uuid=&serial=Serial%20No%2B1&arch=x86_64&extra=1",
            remote,
        )
        .unwrap();
        assert_eq!(r.mac.unwrap().to_string(), "52:54:00:12:34:56");
        assert_eq!(r.uuid, None);
        assert_eq!(r.serial.as_deref(), Some("Serial No+1"));
        assert_eq!(r.arch.as_deref(), Some("x86_64"));
        assert_eq!(r.remote, remote);
        let r = BootRequest::from_query_str("serial=a+b", None).unwrap();
        assert_eq!(r.serial.as_deref(), Some("a b"));
        assert_eq!(BootRequest::from_query_str("", None).unwrap(), BootRequest::default());
        let e = BootRequest::from_query_str("mac=52%3A54%3A00", None).unwrap_err();
        assert_eq!(e.param, "mac");
        assert!(e.to_string().starts_with("mac: "), "{e}");
        assert_eq!(BootRequest::from_query_str("serial=%ZZ", None).unwrap_err().param, "serial");
        assert_eq!(BootRequest::from_query_str("serial=%FF", None).unwrap_err().param, "serial");
        assert_eq!(BootRequest::from_query_str("mac=1&mac=2", None).unwrap_err().param, "mac");
        assert_eq!(BootRequest::from_query_str("arch=x%2F..", None).unwrap_err().param, "arch");
    }

    #[test]
    fn unknown_uuids_are_none_and_bad_values_name_their_parameter() {
        for zero in ["00000000-0000-0000-0000-000000000000", "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF", " "] {
            let r = BootRequest::from_query(&q(&[("uuid", zero), ("serial", "")]), None).unwrap();
            assert_eq!((r.uuid, r.serial, r.mac), (None, None, None), "{zero}");
        }
        let e = BootRequest::from_query(&q(&[("mac", "nope")]), None).unwrap_err();
        assert_eq!(e.param, "mac");
        let e = BootRequest::from_query(&q(&[("uuid", "1234")]), None).unwrap_err();
        assert_eq!(e.param, "uuid");
        let e = BootRequest::from_query(&q(&[("serial", "a\nb")]), None).unwrap_err();
        assert_eq!(e.param, "serial");
        let e = BootRequest::from_query(&q(&[("serial", &"x".repeat(200))]), None).unwrap_err();
        assert_eq!(e.param, "serial");
    }

    fn spec(cmdline: &str) -> BootAction {
        BootAction::Boot(BootSpec {
            profile: "registered".into(),
            kernel: "vmlinuz".into(),
            initrd: "initramfs.img".into(),
            cmdline: cmdline.into(),
        })
    }

    #[test]
    fn scripts_chain_boot_exit_and_sanboot() {
        let entry = entry_script();
        assert!(entry.starts_with("#!ipxe\n"));
        assert!(entry.contains(
            "chain /boot/machine.ipxe?mac=${net0/mac:hexhyp}&uuid=${uuid}&serial=${serial:uristring}&arch=${buildarch:uristring} || goto failed\n"
        ));
        let boot = machine_script(&spec("console=ttyS0 muster.token=a.b")).unwrap();
        assert_eq!(
            boot,
            "#!ipxe\n\
             echo Muster: booting profile registered\n\
             kernel /boot/assets/vmlinuz initrd=initramfs.img console=ttyS0 muster.token=a.b || goto failed\n\
             initrd /boot/assets/initramfs.img || goto failed\n\
             boot || goto failed\n\
             :failed\n\
             echo Muster: boot failed; continuing with the next boot device\n\
             sleep 5\n\
             exit 1\n"
        );
        let exit =
            machine_script(&BootAction::Exit { reason: "boots from disk; ${x}\nshell".into() }).unwrap();
        assert_eq!(
            exit,
            "#!ipxe\necho Muster: not network-booting this machine: boots from disk; ?{x}?shell\nexit\n"
        );
        let disk = machine_script(&BootAction::LocalDisk { reason: "installed".into() }).unwrap();
        assert!(disk.contains("\nsanboot --no-describe --drive 0x80 || goto failed\n"), "{disk}");
        assert!(disk.ends_with("exit\n"));
        assert_eq!(error_script("x\ny"), "#!ipxe\necho Muster: x?y\nsleep 5\nexit 1\n");
    }

    #[test]
    fn unsafe_specs_are_refused() {
        assert_eq!(machine_script(&spec("a\nshell")).unwrap_err().field, "cmdline");
        assert_eq!(machine_script(&spec("a=${net0/ip}")).unwrap_err().field, "cmdline");
        let mut s = BootSpec {
            profile: "p".into(),
            kernel: "../vmlinuz".into(),
            initrd: "initramfs.img".into(),
            cmdline: String::new(),
        };
        assert_eq!(machine_script(&BootAction::Boot(s.clone())).unwrap_err().field, "kernel");
        s.kernel = "vmlinuz".into();
        s.initrd = "a b".into();
        assert_eq!(machine_script(&BootAction::Boot(s)).unwrap_err().field, "initrd");
    }

    #[test]
    fn logs_never_show_a_secret() {
        let cmdline = "console=ttyS0 muster.controller=https://h:7443 muster.ca_hash=sha256:ab \
                       muster.token=abc123.s3cr3tS3CR3T root.password=hunter2 keymap=us api_key=k.v";
        assert_eq!(
            redact_cmdline(cmdline),
            "console=ttyS0 muster.controller=https://h:7443 muster.ca_hash=sha256:ab \
             muster.token=abc123.<redacted> root.password=<redacted> keymap=us api_key=k.<redacted>"
        );
        let action = spec(cmdline);
        let shown = format!("{action:?} {action:#?}");
        assert!(!shown.contains("s3cr3t") && !shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("muster.token=abc123.<redacted>"), "{shown}");
    }
}
