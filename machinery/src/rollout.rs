//! How config generations reach a node and where they stand: the apply mode, a generation's
//! state and each resource's outcome. One vocabulary for the CLI, the controller, the wire and
//! the agent (the wire carries them as `.proto` enums; `muster-proto` converts).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long a try waits for confirmation when the operator gives no timeout.
pub const DEFAULT_TRY_TIMEOUT: Duration = Duration::from_secs(60);
/// The shortest try timeout accepted.
pub const MIN_TRY_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest try timeout accepted.
pub const MAX_TRY_TIMEOUT: Duration = Duration::from_secs(3600);

/// Checks a try timeout; `None` gives the default.
pub fn try_timeout(t: Option<Duration>) -> Result<Duration, String> {
    match t {
        None => Ok(DEFAULT_TRY_TIMEOUT),
        Some(d) if (MIN_TRY_TIMEOUT..=MAX_TRY_TIMEOUT).contains(&d) => Ok(d),
        Some(_) => Err("the try timeout must be between 1s and 1h".into()),
    }
}

/// Implements `as_str`, `Display`, `FromStr` (and serde through them) for a unit-only enum.
macro_rules! words {
    ($(#[$m:meta])* $name:ident, $what:literal { $($(#[$vm:meta])* $v:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "&'static str")]
        pub enum $name { $($(#[$vm])* $v),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$v),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $s),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok($name::$v),)+
                    other => Err(format!(
                        "unknown {} {other:?}: use {}",
                        $what,
                        [$($s),+].join(", ")
                    )),
                }
            }
        }

        /// Stored records from before these were typed kept the default as an empty string.
        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                if s.is_empty() { Ok(Self::default()) } else { s.parse() }
            }
        }

        impl From<$name> for &'static str {
            fn from(v: $name) -> Self {
                v.as_str()
            }
        }
    };
}

words! {
    /// How a new generation is applied on the node.
    ApplyMode, "mode" {
        /// Now.
        #[default]
        Auto => "auto",
        /// Now; the agent reverts it by itself unless it is confirmed in time.
        Try => "try",
        /// On the node's next boot.
        Staged => "staged",
    }
}

words! {
    /// How a try is confirmed.
    ConfirmPolicy, "confirm policy" {
        /// When the agent has reconnected over the new configuration (proof that the node still
        /// reaches the controller).
        #[default]
        Auto => "auto",
        /// Only by `muster config confirm`.
        Manual => "manual",
    }
}

words! {
    /// Where a generation stands on its node.
    GenerationState, "generation state" {
        /// Made, not reported by the agent yet.
        #[default]
        Pending => "pending",
        /// Every resource applied.
        Applied => "applied",
        /// Applied in try mode, waiting for confirmation.
        Trying => "trying",
        /// Waiting for the node's next boot.
        Staged => "staged",
        /// A try that was not confirmed in time; the node went back.
        Reverted => "reverted",
        /// Not applied, or some resources failed.
        Failed => "failed",
    }
}

words! {
    /// What one reconciler pass did with one resource.
    Outcome, "outcome" {
        /// Already as wanted.
        #[default]
        Unchanged => "unchanged",
        /// Changed to what the config says.
        Applied => "applied",
        /// Off from the config and left so (`drift: report`).
        Drifted => "drifted",
        /// Found off by a drift pass and put back.
        Corrected => "corrected",
        /// Not applicable on this node (with the reason).
        Skipped => "skipped",
        /// Could not be applied (with the error).
        Failed => "failed",
        /// No longer in the config: put back as it was before Muster changed it.
        Restored => "restored",
    }
}

impl Outcome {
    /// The node differs (or differed) from its config here.
    pub fn is_drift(self) -> bool {
        matches!(self, Outcome::Drifted | Outcome::Corrected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_and_refuse_strangers() {
        for m in ApplyMode::ALL {
            assert_eq!(m.as_str().parse::<ApplyMode>(), Ok(*m));
        }
        for s in GenerationState::ALL {
            assert_eq!(s.as_str().parse::<GenerationState>(), Ok(*s));
            let json = serde_json::to_string(s).unwrap_or_default();
            assert_eq!(json, format!("\"{s}\""));
        }
        for o in Outcome::ALL {
            assert_eq!(o.as_str().parse::<Outcome>(), Ok(*o));
        }
        let e = "sometimes".parse::<ApplyMode>().unwrap_err();
        assert!(e.contains("auto, try, staged"), "{e}");
        assert!(serde_json::from_str::<Outcome>("\"weird\"").is_err());
        assert_eq!(serde_json::from_str::<ApplyMode>("\"\"").ok(), Some(ApplyMode::Auto));
        assert!("".parse::<ApplyMode>().is_err());
    }

    #[test]
    fn try_timeouts_are_bounded() {
        assert_eq!(try_timeout(None), Ok(DEFAULT_TRY_TIMEOUT));
        assert_eq!(try_timeout(Some(Duration::from_secs(90))), Ok(Duration::from_secs(90)));
        assert!(try_timeout(Some(Duration::from_millis(999))).is_err());
        assert!(try_timeout(Some(Duration::from_secs(3601))).is_err());
    }
}
