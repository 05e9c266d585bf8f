//! The relay's rules, free of I/O: no sockets, no tokio, no clock reads. Time comes in
//! as a `now` argument; storage is reached only by the shell that calls these.
//!
//! - [`limits`]: what a send may add to a mailbox.
//! - [`expiry`]: when a message expires and whether it may still be delivered.
//! - [`delivery`]: the per-connection window of unacknowledged deliveries.
//! - [`auth`]: signature checks that yield [`auth::AuthenticatedDevice`] proof tokens.
//! - [`prefix`]: which peers count as one (an IPv4 address, an IPv6 /64), for
//!   connection caps and rate limits alike.
//! - [`budget`]: relay-wide budgets (queued messages and bytes, index memory, blob
//!   bytes) and the free-disk reserve.
//! - [`rate`]: per-key rate limits ([`rate::RateLimits`]: registrations, devices,
//!   sends, intake, prekeys; media bytes per account). The one rule that holds a
//!   clock: governor reads the relay's `Clock` itself.
//!
//! Exported for benches and tests: `auth`, `budget`, `delivery`, `expiry`, `limits`, `prefix`, `rate`.

pub mod auth;
pub mod budget;
pub mod delivery;
pub mod expiry;
pub mod limits;
pub mod prefix;
pub mod rate;
