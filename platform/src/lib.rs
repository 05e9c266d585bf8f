//! What Tern's relay and client take from the operating system, in one place, so
//! that the rules in both take it as an input:
//!
//! # Layout
//! - [`clock`]: wall-clock time as Unix milliseconds, behind the [`Clock`] trait;
//!   [`ManualClock`] is the clock tests move by hand.
#![forbid(unsafe_code)]

pub mod clock;

pub use clock::{Clock, ManualClock, SystemClock, UnixMillis};
