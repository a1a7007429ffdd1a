//! Bit widths of a quantized model, written `w4a8`: weights, then activations; 32 means
//! full precision.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The widest quantized width (a code of 16 bits still fits an f32 exactly).
pub const MAX_BITS: u32 = 16;
/// The narrowest (1 bit leaves no zero code for unsigned activations).
pub const MIN_BITS: u32 = 2;

/// Weight and activation bit widths; `None` is full precision. Parsed once from `w4a8`,
/// `W4A8`, `w32a4`, …, and written back in lower case, so `"W4A4"` and `"w4a4"` name the
/// same cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Bits {
    weights: Option<u32>,
    activations: Option<u32>,
}

impl Bits {
    /// Full precision (`w32a32`).
    pub const FULL_PRECISION: Bits = Bits {
        weights: None,
        activations: None,
    };

    /// Widths known when the code is written (presets, tests): as [`Bits::new`], but a
    /// width out of range is a bug, caught at compile time in a `const`.
    pub const fn of(weights: u32, activations: u32) -> Bits {
        const fn width(b: u32) -> Option<u32> {
            assert!(
                b == 32 || (b >= MIN_BITS && b <= MAX_BITS),
                "bits out of range"
            );
            if b == 32 {
                None
            } else {
                Some(b)
            }
        }
        Bits {
            weights: width(weights),
            activations: width(activations),
        }
    }

    /// Weight and activation widths, each in 2..=16 or 32 (full precision).
    pub fn new(weights: u32, activations: u32) -> Result<Self> {
        let width = |b: u32, what: &'static str| -> Result<Option<u32>> {
            match b {
                32 => Ok(None),
                b if (MIN_BITS..=MAX_BITS).contains(&b) => Ok(Some(b)),
                b => Err(Error::config(
                    what,
                    b,
                    format!("must be between {MIN_BITS} and {MAX_BITS} (32 = full precision)"),
                )),
            }
        };
        Ok(Bits {
            weights: width(weights, "weight bits")?,
            activations: width(activations, "activation bits")?,
        })
    }

    /// Weight bits; `None` = full precision.
    pub fn weights(self) -> Option<u32> {
        self.weights
    }

    /// Activation bits; `None` = full precision.
    pub fn activations(self) -> Option<u32> {
        self.activations
    }

    pub fn is_full_precision(self) -> bool {
        self == Bits::FULL_PRECISION
    }
}

impl FromStr for Bits {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: String| Error::config("bits", s, why);
        let form = || bad("expected wXaY, e.g. w4a8 (32 = full precision)".into());
        let l = s.trim().to_ascii_lowercase();
        let rest = l.strip_prefix('w').ok_or_else(form)?;
        let (w, a) = rest.split_once('a').ok_or_else(form)?;
        let (w, a): (u32, u32) = match (w.parse(), a.parse()) {
            (Ok(w), Ok(a)) => (w, a),
            _ => return Err(form()),
        };
        Bits::new(w, a).map_err(|_| bad(width_rule()))
    }
}

/// What a width may be, for error messages.
pub(crate) fn width_rule() -> String {
    format!("each width must be between {MIN_BITS} and {MAX_BITS}, or 32 for full precision")
}

impl fmt::Display for Bits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "w{}a{}",
            self.weights.unwrap_or(32),
            self.activations.unwrap_or(32)
        )
    }
}

impl TryFrom<String> for Bits {
    type Error = Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Bits> for String {
    fn from(b: Bits) -> String {
        b.to_string()
    }
}
