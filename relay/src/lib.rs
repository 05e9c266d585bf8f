//! Tern relay.
