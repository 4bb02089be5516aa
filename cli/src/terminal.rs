//! Text that did not come from this program (hostnames, labels, inventory strings, errors a node
//! reported) made safe for a terminal: [`escape`].

use std::borrow::Cow;

/// Whether `c` must not reach a terminal raw: C0 controls (newline, carriage return, tab, ESC,
/// BEL, ...), DEL, C1 controls (U+0080..U+009F, CSI among them), and the Unicode bidirectional
/// controls, which reorder how the rest of a line is shown.
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every control character written as Rust's `escape_debug` writes it (`\n`, `\t`,
/// `\u{1b}`, `\u{9b}`), so a hostname cannot move the cursor, retitle the window, start an
/// escape sequence or break a table row; everything else, ordinary UTF-8 included, is kept.
/// Borrowed when there is nothing to escape.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            match c {
                // escape_debug leaves these as they are (they are printable to Rust).
                '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
                    out.push_str(&c.escape_unicode().to_string())
                }
                _ => out.extend(c.escape_debug()),
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_text_is_kept() {
        let table = [
            ("node-1", "node-1"),
            ("Zürich-µ-节点", "Zürich-µ-节点"),
            ("\u{1b}]0;pwn\u{7}\nx", "\\u{1b}]0;pwn\\u{7}\\nx"),
            ("a\tb\rc", "a\\tb\\rc"),
            ("\u{1b}[2J", "\\u{1b}[2J"),
            ("csi\u{9b}31m", "csi\\u{9b}31m"),
            ("del\u{7f}", "del\\u{7f}"),
            ("nul\0", "nul\\0"),
            ("abc\u{202e}fed", "abc\\u{202e}fed"),
            ("back\\slash \"quoted\" 'it'", "back\\slash \"quoted\" 'it'"),
        ];
        for (raw, want) in table {
            assert_eq!(escape(raw), want, "{raw:?}");
            assert!(!escape(raw).chars().any(unsafe_char), "{raw:?}");
        }
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
    }
}
