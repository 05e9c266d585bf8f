//! Test support. [`postgres`] starts real PostgreSQL clusters and [`s3`] real S3 servers,
//! for this crate's tests and the end-to-end tests; the services' fixtures below are for this crate's unit tests only.

pub mod postgres;
pub mod s3;

pub use postgres::TestPostgres;
pub use s3::TestS3;

#[cfg(test)]
mod fixture;
#[cfg(test)]
pub(crate) use fixture::*;
