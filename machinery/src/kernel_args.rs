//! The `muster.*` kernel parameters a network-booted (or image-baked) agent finds its controller
//! by: `muster.controller=https://HOST:PORT muster.ca_hash=sha256:… muster.token=ID.SECRET`, and
//! optionally `muster.state_dir=`, `muster.heartbeat=`, `muster.service_checks=a,b`. One builder
//! for the boot service, the lab and the tests, one parser for the agent.

use std::fmt;

/// The `muster.*` parameters of a kernel command line. Values are kept as given; the agent
/// checks each (naming the parameter) when it resolves its settings.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KernelArgs {
    /// `muster.controller=`: the controller's gRPC URL.
    pub controller: Option<String>,
    /// `muster.ca_hash=`: the CA pin.
    pub ca_hash: Option<String>,
    /// `muster.token=`: a join (usually boot) token.
    pub token: Option<String>,
    /// Every other `muster.KEY=VALUE`, in order.
    pub other: Vec<(String, String)>,
}

impl fmt::Debug for KernelArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelArgs")
            .field("controller", &self.controller)
            .field("ca_hash", &self.ca_hash)
            .field("token", &self.token.as_ref().map(|t| crate::token::redact(t)))
            .field("other", &self.other)
            .finish()
    }
}

impl KernelArgs {
    /// The three parameters an agent needs to enroll.
    pub fn enrollment(controller: &str, ca_hash: &str, token: &str) -> Self {
        Self {
            controller: Some(controller.to_owned()),
            ca_hash: Some(ca_hash.to_owned()),
            token: Some(token.to_owned()),
            other: Vec::new(),
        }
    }

    /// The `muster.*` parameters of `cmdline` (double quotes allowed around a value); anything
    /// else on the line is ignored. A parameter given twice: the last one counts.
    pub fn parse(cmdline: &str) -> Self {
        let mut out = Self::default();
        for (k, v) in words(cmdline).filter_map(|w| {
            let rest = w.strip_prefix("muster.")?;
            let (k, v) = rest.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        }) {
            match k.as_str() {
                "controller" => out.controller = Some(v),
                "ca_hash" => out.ca_hash = Some(v),
                "token" => out.token = Some(v),
                _ => out.other.push((k, v)),
            }
        }
        out
    }

    /// The last value of another `muster.KEY=`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.other.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// `extra` (other kernel parameters, e.g. `console=ttyS0`) followed by these.
    pub fn after(&self, extra: &str) -> String {
        let extra = extra.trim();
        let own = self.to_string();
        match (extra.is_empty(), own.is_empty()) {
            (true, _) => own,
            (false, true) => extra.to_owned(),
            (false, false) => format!("{extra} {own}"),
        }
    }
}

/// `muster.controller=… muster.ca_hash=… muster.token=…` (then the others), space-separated.
impl fmt::Display for KernelArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let known = [("controller", &self.controller), ("ca_hash", &self.ca_hash), ("token", &self.token)];
        let mut first = true;
        let mut put = |f: &mut fmt::Formatter<'_>, k: &str, v: &str| {
            let sep = if first { "" } else { " " };
            first = false;
            if k.chars().any(char::is_whitespace) {
                // A key with spaces (only a quoted command line has one): quote the whole word.
                write!(f, "{sep}\"muster.{k}={v}\"")
            } else if v.chars().any(char::is_whitespace) {
                write!(f, "{sep}muster.{k}=\"{v}\"")
            } else {
                write!(f, "{sep}muster.{k}={v}")
            }
        };
        for (k, v) in known {
            if let Some(v) = v {
                put(f, k, v)?;
            }
        }
        for (k, v) in &self.other {
            put(f, k, v)?;
        }
        Ok(())
    }
}

/// Splits a kernel command line into words; double quotes group (and are dropped).
fn words(cmdline: &str) -> impl Iterator<Item = String> + '_ {
    let mut chars = cmdline.trim().chars().peekable();
    std::iter::from_fn(move || {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        chars.peek()?;
        let mut word = String::new();
        let mut quoted = false;
        for c in chars.by_ref() {
            match c {
                '"' => quoted = !quoted,
                c if c.is_whitespace() && !quoted => break,
                c => word.push(c),
            }
        }
        Some(word)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_what_it_parses() {
        let k = KernelArgs::enrollment("https://10.0.2.100:7443", "sha256:ab", "id.secret");
        assert_eq!(
            k.after(" console=ttyS0 "),
            "console=ttyS0 muster.controller=https://10.0.2.100:7443 muster.ca_hash=sha256:ab muster.token=id.secret"
        );
        assert!(!k.after("").starts_with(' '));
        assert_eq!(KernelArgs::parse(&k.after("console=ttyS0 quiet")), k);
    }

    #[test]
    fn parses_a_real_command_line() {
        let k = KernelArgs::parse(
            "BOOT_IMAGE=/vmlinuz quiet muster.controller=https://k:1 muster.token=a.b root=/dev/sda1 \
             muster.x=\"a b\" muster.heartbeat=2s muster.heartbeat=3s muster.novalue\n",
        );
        assert_eq!(k.controller.as_deref(), Some("https://k:1"));
        assert_eq!(k.token.as_deref(), Some("a.b"));
        assert_eq!(k.ca_hash, None);
        assert_eq!(k.get("x"), Some("a b"));
        assert_eq!(k.get("heartbeat"), Some("3s"), "the last one counts");
        assert_eq!(k.get("novalue"), None);
        assert!(!format!("{k:?}").contains("a.b"), "{k:?}");
        assert_eq!(KernelArgs::parse(&k.to_string()).get("x"), Some("a b"), "quotes survive a round trip");
    }

    #[test]
    fn a_quoted_key_with_spaces_survives_a_round_trip() {
        // Found by fuzzing (fuzz/regressions/kernel_args/): shown unquoted, it parsed back as
        // nothing.
        let k = KernelArgs::parse("\"muster.a b=c\" muster.d=\"e f\"");
        assert_eq!(k.other, [("a b".to_owned(), "c".to_owned()), ("d".to_owned(), "e f".to_owned())]);
        assert_eq!(k.to_string(), "\"muster.a b=c\" muster.d=\"e f\"");
        assert_eq!(KernelArgs::parse(&k.to_string()), k);
    }
}
