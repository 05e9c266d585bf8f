//! Tern client.
