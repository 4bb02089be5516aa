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
    pub param: &'static str,
    pub problem: String,
}

impl BootRequest {
    /// From the (already URL-decoded) query of `/boot/machine.ipxe`.
    pub fn from_query(q: &HashMap<String, String>, remote: Option<IpAddr>) -> Result<Self, QueryError> {
        let text = |k: &'static str| -> Result<Option<String>, QueryError> {
            match q.get(k).map(|v| v.trim()) {
                None | Some("") => Ok(None),
                Some(v) if v.len() > 128 || v.chars().any(char::is_control) => {
                    Err(QueryError { param: k, problem: "too long or not printable".into() })
                }
                Some(v) => Ok(Some(v.to_owned())),
            }
        };
        let mac = text("mac")?
            .map(|m| m.parse::<MacAddr>().map_err(|e| QueryError { param: "mac", problem: e.to_string() }))
            .transpose()?;
        let uuid = text("uuid")?.map(|u| u.to_ascii_lowercase()).filter(|u| {
            let digits: Vec<char> = u.chars().filter(char::is_ascii_hexdigit).collect();
            !digits.iter().all(|c| *c == '0')
        });
        if let Some(u) = &uuid {
            let hex = u.chars().filter(|c| *c != '-').count();
            if hex != 32 || !u.chars().all(|c| c == '-' || c.is_ascii_hexdigit()) {
                return Err(QueryError { param: "uuid", problem: format!("{u:?} is not a UUID") });
            }
        }
        Ok(BootRequest { mac, uuid, serial: text("serial")?, arch: text("arch")?, remote })
    }
}

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSpec {
    /// Why this machine gets this (e.g. `registered`, `discovery`), shown on its console.
    pub profile: String,
    /// Asset names (files in the assets directory).
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
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
}

/// The entry script: chains the per-machine script with what iPXE knows about the machine.
/// The URL is relative, so it resolves against wherever this script came from.
pub fn entry_script() -> String {
    "#!ipxe\n\
     echo Muster network boot: asking for this machine's script\n\
     chain machine.ipxe?mac=${net0/mac:uristring}&uuid=${uuid:uristring}&serial=${serial:uristring}&arch=${buildarch:uristring} || goto failed\n\
     exit\n\
     :failed\n\
     echo Muster: could not fetch the machine script; continuing with the next boot device\n\
     sleep 5\n\
     exit 1\n"
        .to_owned()
}

/// Something safe to put on an iPXE `echo` line.
fn echo_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
        .collect::<String>()
        .replace('$', "?")
}

/// The per-machine script for `action`.
pub fn machine_script(action: &BootAction) -> String {
    match action {
        BootAction::Boot(b) => format!(
            "#!ipxe\n\
             echo Muster: booting profile {profile}\n\
             kernel assets/{kernel} initrd={initrd} {cmdline} || goto failed\n\
             initrd assets/{initrd} || goto failed\n\
             boot || goto failed\n\
             :failed\n\
             echo Muster: boot failed; continuing with the next boot device\n\
             sleep 5\n\
             exit 1\n",
            profile = echo_safe(&b.profile),
            kernel = b.kernel,
            initrd = b.initrd,
            cmdline = b.cmdline,
        ),
        BootAction::Exit { reason } => {
            format!("#!ipxe\necho Muster: not network-booting this machine: {}\nexit\n", echo_safe(reason))
        }
    }
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
    fn unknown_uuids_are_none_and_bad_values_name_their_parameter() {
        let r = BootRequest::from_query(
            &q(&[("uuid", "00000000-0000-0000-0000-000000000000"), ("serial", "")]),
            None,
        )
        .unwrap();
        assert_eq!((r.uuid, r.serial, r.mac), (None, None, None));
        let e = BootRequest::from_query(&q(&[("mac", "nope")]), None).unwrap_err();
        assert_eq!(e.param, "mac");
        let e = BootRequest::from_query(&q(&[("uuid", "1234")]), None).unwrap_err();
        assert_eq!(e.param, "uuid");
        let e = BootRequest::from_query(&q(&[("serial", "a\nb")]), None).unwrap_err();
        assert_eq!(e.param, "serial");
    }

    #[test]
    fn scripts_chain_boot_and_exit() {
        assert!(entry_script().starts_with("#!ipxe\n"));
        assert!(
            entry_script().contains("chain machine.ipxe?mac=${net0/mac:uristring}&uuid=${uuid:uristring}")
        );
        let boot = machine_script(&BootAction::Boot(BootSpec {
            profile: "registered".into(),
            kernel: "vmlinuz".into(),
            initrd: "initramfs.img".into(),
            cmdline: "console=ttyS0 muster.token=a.b".into(),
        }));
        assert!(
            boot.contains("kernel assets/vmlinuz initrd=initramfs.img console=ttyS0 muster.token=a.b"),
            "{boot}"
        );
        assert!(boot.contains("initrd assets/initramfs.img"));
        let exit = machine_script(&BootAction::Exit { reason: "boots from disk; $x".into() });
        assert!(exit.ends_with("exit\n") && !exit.contains('$'), "{exit}");
    }
}
