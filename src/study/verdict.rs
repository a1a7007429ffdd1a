//! A finding's verdict: its status, the numbers it rests on and its margin. The types of
//! [`super::results::StudyResults`]'s `findings`, computed by [`super::findings`].

use serde::{Deserialize, Serialize};

use crate::eval::Accuracy;

/// A verdict's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Holds,
    DoesNotHold,
    Undecided,
    NotTested,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Holds => "holds",
            Status::DoesNotHold => "does not hold",
            Status::Undecided => "undecided",
            Status::NotTested => "not tested",
        })
    }
}

/// A number a verdict used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Number {
    pub label: String,
    pub value: f64,
    pub correct: Option<usize>,
    pub total: Option<usize>,
    pub ci95: Option<(f64, f64)>,
}

impl Number {
    pub(crate) fn count(label: impl Into<String>, a: Accuracy) -> Self {
        Number {
            label: label.into(),
            value: a.fraction(),
            correct: Some(a.correct),
            total: Some(a.total),
            ci95: Some(a.interval95()),
        }
    }
    pub(crate) fn value(label: impl Into<String>, value: f64) -> Self {
        Number {
            label: label.into(),
            value,
            correct: None,
            total: None,
            ci95: None,
        }
    }
}

/// One finding's verdict, with the numbers and margin it rests on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// `F1` .. `F6`.
    pub id: String,
    pub claim: String,
    pub status: Status,
    /// What was compared, in words.
    pub measure: String,
    /// The compared difference (first group − second) and its 95% interval.
    pub margin: Option<f64>,
    pub margin_ci95: Option<(f64, f64)>,
    pub numbers: Vec<Number>,
    pub note: String,
}

impl Verdict {
    pub(crate) fn not_tested(id: &str, claim: &str, why: &str) -> Self {
        Verdict {
            id: id.into(),
            claim: claim.into(),
            status: Status::NotTested,
            measure: String::new(),
            margin: None,
            margin_ci95: None,
            numbers: Vec::new(),
            note: why.into(),
        }
    }
}
