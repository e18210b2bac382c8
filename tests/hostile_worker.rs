//! Hostile workers: each test makes the primary face a worker that lies,
//! floods or reaches for privileges, and checks that the primary stays
//! bounded, reports and kills the liar where that is the rule, and that an
//! honest worker beside it keeps serving.

mod common;

#[path = "hostile_worker/primary.rs"]
mod primary;
