//! Log output that holds no IP address (P9), whoever wrote the line.
//!
//! The relay's own lines never name a peer, but its dependencies' may: quinn-udp
//! warns about a failed send with the destination address, and quinn-proto traces
//! peers. [`Redacting`] wraps the event formatter: each formatted line goes through
//! [`redact_addresses`] and [`redact_numbers`] before it is written, at every level,
//! in either format ([`install`]: text or JSON, one object a line).
//!
//! Lines carry no ANSI colour codes: [`Redacting`] formats into a plain string, and
//! the layer's own (span fields) is on only when standard error is a terminal, so a
//! log file or journal holds plain text.

use std::borrow::Cow;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// What an address is replaced with.
pub const REDACTED: &str = "<addr>";

/// Targets whose logs are capped unless the spec names them: the database pool's
/// per-connection warnings (one per pooled connection an outage breaks; the store
/// warns once per outage instead), and the HTTP client's (push wake-ups), whose
/// debug lines name the host and port of a device's push endpoint (P9).
const CAPPED: [(&str, &str); 4] = [
    ("deadpool", "deadpool.postgres=error"),
    ("reqwest", "reqwest=warn"),
    ("hyper_util", "hyper_util=warn"),
    ("hyper", "hyper=warn"),
];

/// The log filter for `spec` (`--log`, `TERN_LOG`): as given, with each target of
/// `CAPPED` capped unless `spec` names it.
pub fn filter(
    spec: &str,
) -> Result<tracing_subscriber::EnvFilter, tracing_subscriber::filter::ParseError> {
    let mut f = tracing_subscriber::EnvFilter::try_new(spec)?;
    for (name, directive) in CAPPED {
        if !spec.contains(name) {
            f = f.add_directive(directive.parse()?);
        }
    }
    Ok(f)
}

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (with
    /// `message`) and the spans.
    Json,
}

/// Installs the process's log subscriber: lines to standard error, filtered by `spec`
/// (see [`filter`]), in `format`, every line redacted.
pub fn install(spec: &str, format: LogFormat) -> Result<(), String> {
    use std::io::IsTerminal;
    let filter = filter(spec).map_err(|e| format!("--log {spec}: {e}"))?;
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let installed = match format {
        LogFormat::Text => builder
            .event_format(Redacting(tracing_subscriber::fmt::format()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .event_format(Redacting(tracing_subscriber::fmt::format().json()))
            .try_init(),
    };
    installed.map_err(|e| format!("installing the logger: {e}"))
}

/// An event formatter that formats with `F`, then redacts addresses.
#[derive(Debug, Clone, Default)]
pub struct Redacting<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for Redacting<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        writer.write_str(&redact_numbers(&redact_addresses(&line)))
    }
}

/// What a phone number is replaced with.
pub const REDACTED_NUMBER: &str = "<number>";

/// `text` with every `+` followed by 7 to 15 ASCII digits (an E.164 number, and the
/// digits after it if more follow) replaced by [`REDACTED_NUMBER`]. Defence in depth:
/// the relay never logs a number, this catches a dependency's line that would.
pub fn redact_numbers(text: &str) -> Cow<'_, str> {
    let b = text.as_bytes();
    let mut out: Option<String> = None;
    let (mut i, mut copied) = (0, 0);
    while i < b.len() {
        if b[i] == b'+' {
            let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
            if digits >= 7 {
                let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
                // `+` and digits are ASCII: these are char boundaries.
                o.push_str(text.get(copied..i).unwrap_or_default());
                o.push_str(REDACTED_NUMBER);
                i += 1 + digits;
                copied = i;
                continue;
            }
        }
        i += 1;
    }
    match out {
        Some(mut o) => {
            o.push_str(text.get(copied..).unwrap_or_default());
            Cow::Owned(o)
        }
        None => Cow::Borrowed(text),
    }
}

/// `text` with every IPv4 and IPv6 address replaced by [`REDACTED`], with its port
/// (`1.2.3.4:443`, `[::1]:443`), brackets and zone (`fe80::1%eth0`). Errs towards
/// redacting: any run that parses as an address goes, whatever it meant.
pub fn redact_addresses(text: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(text);
    // Again on its own output until nothing changes: what is left beside a redacted
    // address can be one itself ("::fde23.0.2.33" leaves "::fde"). `<addr>` joins no
    // address, so each pass shrinks what could be one, and a few passes end it.
    for _ in 0..MAX_PASSES {
        match redact_once(&out) {
            Some(next) => out = Cow::Owned(next),
            None => break,
        }
    }
    out
}

/// Passes of [`redact_addresses`]; a line needs two at most in practice.
const MAX_PASSES: usize = 8;

/// `text` with the addresses found in one scan replaced, or `None` if there are none.
fn redact_once(text: &str) -> Option<String> {
    let spans = find_addresses(text.as_bytes());
    if spans.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (start, end) in spans {
        // Spans start and end beside ASCII bytes, so they are char boundaries.
        out.push_str(text.get(at..start).unwrap_or_default());
        out.push_str(REDACTED);
        at = end;
    }
    out.push_str(text.get(at..).unwrap_or_default());
    Some(out)
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn is_address_byte(b: u8) -> bool {
    b.is_ascii_hexdigit() || b == b':' || b == b'.'
}

/// The byte spans of addresses in `b`, in order, not overlapping.
fn find_addresses(b: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !is_address_byte(b[i]) {
            i += 1;
            continue;
        }
        let mut end = i;
        while end < b.len() && is_address_byte(b[end]) {
            end += 1;
        }
        let floor = spans.last().map_or(0, |&(_, e)| e);
        if let Some(span) = address_in_run(b, i, end, floor) {
            spans.push(span);
            // The rest of the run may hold another.
            i = span.1;
        } else {
            i = end;
        }
    }
    spans
}

/// An address in the run `b[start..end]` of hex digits, colons and dots, with what
/// belongs to it around the run (zone, brackets, port). `b[..floor]` is already
/// redacted: its end is a boundary, as `<addr>` will be in the output.
fn address_in_run(b: &[u8], start: usize, end: usize, floor: usize) -> Option<(usize, usize)> {
    let (mut s, mut e) = (start, end);
    // A lone colon or dot at either end is punctuation ("peer:1.2.3.4", "at 1.2.3.4.").
    if b[s] == b':' && b.get(s + 1) != Some(&b':') {
        s += 1;
    }
    while e > s && (b[e - 1] == b'.' || (b[e - 1] == b':' && !(e - s >= 2 && b[e - 2] == b':'))) {
        e -= 1;
    }
    if s >= e {
        return None;
    }
    // Whichever starts first: the rest of the run is searched again after it
    // ("2.0.2.31:db8::17" holds an IPv4 address, then an IPv6 one).
    match (ipv6_in(b, s, e, floor), ipv4_in(b, s, e)) {
        (Some(v6), Some(v4)) if v4.0 < v6.0 => Some(v4),
        (v6, v4) => v6.or(v4),
    }
}

/// The first IPv6 address in the trimmed run `b[s..e]`: the longest from the run's
/// start, else from just after a colon in it ("fe40::1:db8::17" holds two).
fn ipv6_in(b: &[u8], s: usize, e: usize, floor: usize) -> Option<(usize, usize)> {
    (s..e)
        .filter(|&p| p == s || b[p - 1] == b':')
        .find_map(|p| {
            (p + 2..=e.min(p + MAX_IPV6_TEXT))
                .rev()
                .find_map(|q| ipv6_at(b, p, q, floor))
        })
}

/// The first IPv4 address in the trimmed run `b[s..e]`, perhaps with a port: a run of
/// digits and dots in it, even glued to a word ("v10.0.0.1", "a:10.0.0.1").
fn ipv4_in(b: &[u8], s: usize, e: usize) -> Option<(usize, usize)> {
    let mut p = s;
    while p < e {
        let len = b[p..e]
            .iter()
            .take_while(|c| c.is_ascii_digit() || **c == b'.')
            .count();
        if len == 0 {
            p += 1;
            continue;
        }
        let (mut from, mut to) = (p, p + len);
        while from < to && b[from] == b'.' {
            from += 1;
        }
        while to > from && b[to - 1] == b'.' {
            to -= 1;
        }
        let quad = std::str::from_utf8(&b[from..to]).ok()?;
        if quad.parse::<Ipv4Addr>().is_ok() {
            return Some((from, with_port(b, to)));
        }
        p += len;
    }
    None
}

/// The longest text of an IPv6 address without its zone
/// (`ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`).
const MAX_IPV6_TEXT: usize = 45;

/// An IPv6 address exactly at `b[s..e]`, standing apart from words around it (so
/// that `quinn::endpoint` stays; the end of a redacted span at `floor` is no word),
/// with its zone, brackets and port.
fn ipv6_at(b: &[u8], s: usize, e: usize, floor: usize) -> Option<(usize, usize)> {
    if s >= e || (s > floor && is_word(b[s - 1])) || (e < b.len() && is_word(b[e])) {
        return None;
    }
    let candidate = std::str::from_utf8(&b[s..e]).ok()?;
    if candidate.bytes().filter(|&c| c == b':').count() < 2 {
        return None;
    }
    candidate.parse::<Ipv6Addr>().ok()?;
    let mut end = e;
    if b.get(end) == Some(&b'%') {
        end += 1;
        while end < b.len() && is_word(b[end]) {
            end += 1;
        }
    }
    if s > 0 && b[s - 1] == b'[' && b.get(end) == Some(&b']') {
        return Some((s - 1, with_port(b, end + 1)));
    }
    Some((s, end))
}

/// `at` moved past a `:port` there, if any.
fn with_port(b: &[u8], at: usize) -> usize {
    if b.get(at) != Some(&b':') {
        return at;
    }
    let digits = b[at + 1..]
        .iter()
        .take_while(|c| c.is_ascii_digit())
        .count();
    if digits == 0 {
        at
    } else {
        at + 1 + digits
    }
}

#[cfg(test)]
mod tests;
