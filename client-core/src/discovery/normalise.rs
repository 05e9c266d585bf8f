//! Address-book numbers to E.164.
//!
//! With the default feature `phonenumbers`, numbers are parsed by the `phonenumber`
//! crate (a port of libphonenumber): national formats are read in the user's
//! `default_region`, and a number must be valid for its country. Without the
//! feature a minimal normaliser takes only international forms: spaces and
//! `-().` are dropped, a leading `00` becomes `+`, and what remains must be `+`
//! and 7 to 15 digits not starting with 0; national formats are refused.

/// Whether `s` is an E.164 number as the relay takes it: `+`, then 7 to 15 digits,
/// the first not 0.
pub fn is_e164(s: &str) -> bool {
    let Some(digits) = s.strip_prefix('+') else {
        return false;
    };
    (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// `input` (as typed in an address book) in E.164, or `None` if it is not a valid
/// number. `default_region` (ISO 3166 alpha-2, say `"GB"`) is how national
/// formats are read; an unknown region reads only international forms.
pub fn normalise(input: &str, default_region: &str) -> Option<String> {
    let e164 = parse(input.trim(), default_region)?;
    is_e164(&e164).then_some(e164)
}

#[cfg(feature = "phonenumbers")]
fn parse(input: &str, default_region: &str) -> Option<String> {
    use phonenumber::{country, Mode};
    let region: Option<country::Id> = default_region.to_ascii_uppercase().parse().ok();
    let number = phonenumber::parse(region, input).ok()?;
    if !phonenumber::is_valid(&number) {
        return None;
    }
    Some(number.format().mode(Mode::E164).to_string())
}

#[cfg(not(feature = "phonenumbers"))]
fn parse(input: &str, _default_region: &str) -> Option<String> {
    let kept: String = input
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '(' | ')' | '.'))
        .collect();
    if let Some(rest) = kept.strip_prefix("00") {
        return Some(format!("+{rest}"));
    }
    kept.starts_with('+').then_some(kept)
}
