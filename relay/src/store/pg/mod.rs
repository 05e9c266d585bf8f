//! The shared backend (#15): every store in one PostgreSQL database, so any number of
//! relay nodes can serve the same accounts. For now only its schema and how it is
//! migrated; the stores follow.

pub mod migrate;
