//! Untrusted text in logs: what a client sent (an asset or TFTP file name, a query value, a TFTP
//! client's error message) is logged through [`Untrusted`], so a name with a newline cannot start
//! a forged log line and a terminal escape cannot reach the operator's terminal.

use std::fmt::{self, Write as _};

/// Shown at most this many characters of an untrusted string (the rest is counted, not shown).
const MAX_CHARS: usize = 256;

/// Displays a client's string for a log line: control characters (newlines, escapes, …),
/// Unicode line and paragraph separators, bidirectional overrides and `\` are escaped as Rust's
/// `escape_default` does (`\n`, `\u{1b}`, `\\`); everything else shows as sent. Long strings
/// are cut after 256 characters.
///
/// ```
/// use muster_pxe::Untrusted;
/// assert_eq!(Untrusted("x\nFORGED").to_string(), "x\\nFORGED");
/// ```
#[derive(Clone, Copy)]
pub struct Untrusted<'a>(pub &'a str);

fn needs_escape(c: char) -> bool {
    c.is_control()
        || c == '\\'
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shown, (i, c)) in self.0.char_indices().enumerate() {
            if shown == MAX_CHARS {
                return write!(f, "…({} more bytes)", self.0.len() - i);
            }
            if needs_escape(c) {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_could_forge_or_hide_a_line() {
        assert_eq!(Untrusted("vmlinuz").to_string(), "vmlinuz");
        assert_eq!(Untrusted("x\nFORGED\r\t").to_string(), "x\\nFORGED\\r\\t");
        assert_eq!(Untrusted("\u{1b}[31mred").to_string(), "\\u{1b}[31mred");
        assert_eq!(Untrusted("a\\nb").to_string(), "a\\\\nb");
        assert_eq!(Untrusted("a\u{2028}b\u{202e}").to_string(), "a\\u{2028}b\\u{202e}");
        assert_eq!(Untrusted("ünïcode ok").to_string(), "ünïcode ok");
        assert_eq!(format!("{:?}", Untrusted("a\nb")), "\"a\\nb\"");
        let long = "y".repeat(300);
        assert_eq!(Untrusted(&long).to_string(), format!("{}…(44 more bytes)", "y".repeat(256)));
    }
}
