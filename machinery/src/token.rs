//! Join tokens: `<id>.<secret>`, where `id` is 6 and `secret` 32 characters of `[a-z0-9]`.
//!
//! The id is public (it names the token in `muster token list`); the secret never is. The
//! controller stores only the SHA-256 of the whole token and compares digests in constant time.

use std::fmt;

use ring::digest;

/// Length of the public token id.
pub const ID_LEN: usize = 6;
/// Length of the secret part.
pub const SECRET_LEN: usize = 32;
const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Why a string is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenFormatError {
    #[error("token is empty")]
    Empty,
    #[error("token must look like <id>.<secret> (6 and 32 characters of a-z, 0-9)")]
    Shape,
}

/// A parsed join token. `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    id: String,
    secret: String,
}

impl JoinToken {
    /// Parses and checks the shape of a token.
    pub fn parse(s: &str) -> Result<Self, TokenFormatError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(TokenFormatError::Empty);
        }
        let (id, secret) = s.split_once('.').ok_or(TokenFormatError::Shape)?;
        let ok = |part: &str, len: usize| part.len() == len && part.bytes().all(|b| ALPHABET.contains(&b));
        if !ok(id, ID_LEN) || !ok(secret, SECRET_LEN) {
            return Err(TokenFormatError::Shape);
        }
        Ok(Self { id: id.to_owned(), secret: secret.to_owned() })
    }

    /// Builds a token from random bytes (the caller supplies the randomness, so this stays pure).
    /// `random` needs at least `ID_LEN + SECRET_LEN` bytes.
    pub fn from_random(random: &[u8]) -> Option<Self> {
        if random.len() < ID_LEN + SECRET_LEN {
            return None;
        }
        // 256 % 36 != 0, so reduce with rejection-free mapping over 2 bytes worth of bias: the bias
        // (< 1%) is irrelevant for a 32-character secret (~165 bits).
        let pick = |b: u8| ALPHABET[usize::from(b) % ALPHABET.len()] as char;
        let id = random[..ID_LEN].iter().copied().map(pick).collect();
        let secret = random[ID_LEN..ID_LEN + SECRET_LEN].iter().copied().map(pick).collect();
        Some(Self { id, secret })
    }

    /// The public id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The SHA-256 digest of the whole token, as stored by the controller.
    pub fn digest(&self) -> [u8; 32] {
        let d = digest::digest(&digest::SHA256, self.to_string().as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }

    /// Constant-time comparison of this token's digest with a stored one.
    pub fn matches_digest(&self, stored: &[u8]) -> bool {
        let mine = self.digest();
        if stored.len() != mine.len() {
            return false;
        }
        // Fold every byte so the time does not depend on where the first difference is.
        mine.iter().zip(stored).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

/// A token string with its secret replaced, for logs and `Debug` output: `ID.<redacted>`.
/// Anything that does not look like `ID.SECRET` is redacted whole.
pub fn redact(token: &str) -> String {
    match token.split_once('.') {
        Some((id, _)) if id.len() == ID_LEN && id.bytes().all(|b| ALPHABET.contains(&b)) => {
            format!("{id}.<redacted>")
        }
        _ => "<redacted>".to_owned(),
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({}.<redacted>)", self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "abc123.0123456789abcdefghijklmnopqrstuv";

    #[test]
    fn parses_well_formed_token() {
        let t = JoinToken::parse(GOOD).unwrap();
        assert_eq!(t.id(), "abc123");
        assert_eq!(t.to_string(), GOOD);
        assert_eq!(JoinToken::parse(&format!("  {GOOD}\n")).unwrap(), t);
    }

    #[test]
    fn rejects_malformed_tokens() {
        assert_eq!(JoinToken::parse(""), Err(TokenFormatError::Empty));
        for bad in [
            "abc123",
            "abc123.",
            "abc12.0123456789abcdefghijklmnopqrstuv",
            "abc123.0123456789abcdefghijklmnopqrstu",
            "ABC123.0123456789abcdefghijklmnopqrstuv",
            "abc123.0123456789abcdefghijklmnopqrstu!",
            "abc123.0123456789abcdefghijklmnopqrstuv.x",
            "abc123-0123456789abcdefghijklmnopqrstuv",
        ] {
            assert_eq!(JoinToken::parse(bad), Err(TokenFormatError::Shape), "{bad}");
        }
    }

    #[test]
    fn digest_matches_only_same_token() {
        let t = JoinToken::parse(GOOD).unwrap();
        let other = JoinToken::parse("abc123.0123456789abcdefghijklmnopqrstuw").unwrap();
        assert!(t.matches_digest(&t.digest()));
        assert!(!other.matches_digest(&t.digest()));
        assert!(!t.matches_digest(&t.digest()[..31]));
        assert!(!t.matches_digest(&[]));
    }

    #[test]
    fn any_difference_from_the_stored_digest_is_a_mismatch() {
        let t = JoinToken::parse(GOOD).unwrap();
        let d = t.digest();
        for i in 0..d.len() {
            for bit in 0..8 {
                let mut x = d;
                x[i] ^= 1 << bit;
                assert!(!t.matches_digest(&x), "byte {i} bit {bit}");
            }
        }
        // Differences that cancel out when XORed together are differences all the same.
        let mut x = d;
        x[0] ^= 0x5a;
        x[31] ^= 0x5a;
        assert!(!t.matches_digest(&x));
        let mut longer = d.to_vec();
        longer.push(0);
        assert!(!t.matches_digest(&longer));
    }

    #[test]
    fn debug_hides_secret() {
        let t = JoinToken::parse(GOOD).unwrap();
        assert_eq!(format!("{t:?}"), "JoinToken(abc123.<redacted>)");
    }

    #[test]
    fn redact_keeps_a_well_formed_id_and_nothing_else() {
        assert_eq!(redact(GOOD), "abc123.<redacted>");
        // Whatever follows the first dot goes, even more dots.
        assert_eq!(redact("abc123.x.y"), "abc123.<redacted>");
        // An id that is not one (wrong length, characters outside the alphabet) might be a
        // secret pasted in the wrong place: all of it is hidden.
        for odd in [
            "0123456789abcdefghijklmnopqrstuv",
            "abc12.0123456789abcdefghijklmnopqrstuv",
            "abc1234.0123456789abcdefghijklmnopqrstuv",
            "ABC123.0123456789abcdefghijklmnopqrstuv",
            "abc-12.0123456789abcdefghijklmnopqrstuv",
            ".0123456789abcdefghijklmnopqrstuv",
            "",
        ] {
            assert_eq!(redact(odd), "<redacted>", "{odd:?}");
        }
    }

    #[test]
    fn random_tokens_round_trip() {
        let bytes: Vec<u8> = (0u8..38).map(|i| i.wrapping_mul(97)).collect();
        let t = JoinToken::from_random(&bytes).unwrap();
        assert_eq!(JoinToken::parse(&t.to_string()).unwrap(), t);
        assert!(JoinToken::from_random(&bytes[..10]).is_none());
    }

    #[test]
    fn random_bytes_map_onto_the_whole_alphabet() {
        // Byte i picks ALPHABET[i % 36]: all 36 characters can appear, so a secret keeps its
        // ~165 bits (a mapping onto fewer characters would still parse, with less entropy).
        let bytes: Vec<u8> = (0u8..38).collect();
        let t = JoinToken::from_random(&bytes).unwrap();
        assert_eq!(t.to_string(), "abcdef.ghijklmnopqrstuvwxyz0123456789ab");
        let high: Vec<u8> = (218u8..=255).collect();
        assert_eq!(
            JoinToken::from_random(&high).unwrap().to_string(),
            "cdefgh.ijklmnopqrstuvwxyz0123456789abcd"
        );
        // Exactly ID_LEN + SECRET_LEN bytes are enough; one fewer is not; extra ones are unused.
        assert!(JoinToken::from_random(&bytes[..ID_LEN + SECRET_LEN - 1]).is_none());
        let mut more = bytes.clone();
        more.extend([1, 2, 3]);
        assert_eq!(JoinToken::from_random(&more).unwrap(), t);
    }

    #[test]
    fn redact_keeps_only_a_well_formed_id() {
        assert_eq!(redact(GOOD), "abc123.<redacted>");
        assert_eq!(redact("abc123.anything at all"), "abc123.<redacted>");
        for bad in [
            "",
            "abc123",
            "0123456789abcdefghijklmnopqrstuv",
            "abc12.0123456789abcdefghijklmnopqrstuv",
            "abc1234.0123456789abcdefghijklmnopqrstuv",
            "ABC123.0123456789abcdefghijklmnopqrstuv",
            "abc!23.0123456789abcdefghijklmnopqrstuv",
            "hunter2-password.x",
        ] {
            assert_eq!(redact(bad), "<redacted>", "{bad}");
        }
    }

    #[test]
    fn debug_shows_the_id_only() {
        let t = JoinToken::parse(GOOD).unwrap();
        assert_eq!(format!("{t:?}"), "JoinToken(abc123.<redacted>)");
    }
}
