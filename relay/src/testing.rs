//! Test support. [`postgres`] starts real PostgreSQL clusters, for this crate's tests and
//! the end-to-end tests; the services' fixtures below are for this crate's unit tests only.

pub mod postgres;

pub use postgres::TestPostgres;

#[cfg(test)]
mod fixture;
#[cfg(test)]
pub(crate) use fixture::*;
