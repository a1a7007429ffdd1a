//! Pictures and reports drawn from results. For now: a PNG grid of adversarial examples.

pub mod examples;
