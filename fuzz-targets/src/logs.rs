//! The relay's log redaction: what P9 relies on to keep addresses out of log lines.

use std::net::{IpAddr, SocketAddr};

use tern_relay::logging::redact_addresses;

/// A log line (the bytes as lossy UTF-8) through `redact_addresses`. Rule: no token of
/// the output, nor the same token without brackets, zone, port or trailing
/// punctuation, parses as an IP address or a socket address.
pub fn redact(data: &[u8]) {
    let line = String::from_utf8_lossy(data);
    let out = redact_addresses(&line);
    for token in out.split(|c: char| !(c.is_ascii_alphanumeric() || ":.[]%_".contains(c))) {
        assert!(
            !is_address(token),
            "{token:?} survives redaction in {out:?} (input {line:?})"
        );
    }
}

fn is_address(token: &str) -> bool {
    let trimmed = token.trim_end_matches(['.', ':']);
    let bare = trimmed.trim_start_matches('[').trim_end_matches(']');
    let unzoned = bare.split('%').next().unwrap_or_default();
    [token, trimmed, bare, unzoned]
        .iter()
        .any(|t| t.parse::<IpAddr>().is_ok() || t.parse::<SocketAddr>().is_ok())
}
