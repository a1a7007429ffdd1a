//! Pictures and reports drawn from results: adversarial-example grids ([`examples`]), line
//! plots ([`plots`]) and the study's `report.md` ([`study`]).

pub mod examples;
pub mod plots;
pub mod study;
