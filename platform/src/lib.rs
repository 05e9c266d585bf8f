//! What Tern's relay and client take from the operating system, in one place, so
//! that the rules in both take it as an input:
//!
//! # Layout
//! - [`clock`]: wall-clock time as Unix milliseconds, behind the [`Clock`] trait;
//!   [`ManualClock`] is the clock tests move by hand.
//! - [`direct_io`]: file reads and writes that bypass the page cache (`O_DIRECT`)
//!   where the system takes them, with the aligned buffers they need
//!   ([`AlignedBuf`]) and the fallback to the page cache where it does not.
#![forbid(unsafe_code)]

pub mod clock;
pub mod direct_io;

pub use clock::{Clock, ManualClock, SystemClock, UnixMillis};
pub use direct_io::{AlignedBuf, DIRECT_ALIGN};
