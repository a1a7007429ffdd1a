//! The crate's error type. Every variant names what was wrong and where (a path, a shape,
//! a setting), so that a user can act on the message without reading the code.

use std::path::PathBuf;

/// Errors of the quant-robust library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A data file exists but its content is not what its format promises.
    #[error("{path}: {problem}")]
    BadData { path: PathBuf, problem: String },

    /// A setting is outside what the code accepts.
    #[error("invalid setting `{name}` = {value}: {reason}")]
    Config {
        name: &'static str,
        value: String,
        reason: String,
    },

    /// A checkpoint does not match the model it is loaded into.
    #[error("checkpoint {path}: {problem}")]
    Checkpoint { path: PathBuf, problem: String },

    /// The requested device cannot be used.
    #[error("device: {0}")]
    Device(String),

    /// Training diverged (NaN or Inf loss).
    #[error(
        "training diverged: loss is {loss} at epoch {epoch}, step {step}; \
         the last good checkpoint (if any) was kept"
    )]
    Diverged {
        epoch: usize,
        step: usize,
        loss: f32,
    },

    /// An attack's output failed the final checks (outside the ε-ball or [0, 1], not
    /// finite): a bug in the attack, never a result.
    #[error("attack {attack}: {problem}")]
    AttackCheck { attack: String, problem: String },

    /// JSON (de)serialization failed.
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Bad content in a data file.
    pub fn bad_data(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Error::BadData {
            path: path.into(),
            problem: problem.into(),
        }
    }

    /// An invalid setting.
    pub fn config(name: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        Error::Config {
            name,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}
