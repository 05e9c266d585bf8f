//! Push targets: where a relay sends a device's content-free wake-ups.
//!
//! A [`PushTarget`] is checked here for form only (lengths, characters); whether the
//! relay accepts it (https, the operator's gateway allowlist, the UnifiedPush
//! discovery answer) is the relay's decision.

use crate::code::ErrorCode;
use crate::error::{Malformed, Problem};
use crate::limits::{MAX_PUSH_TOKEN, MAX_PUSH_URL};
use crate::v1;

/// Where a device's wake-ups go.
///
/// `Debug` shows the kind only: an endpoint or a device token addresses one phone,
/// and stays out of logs (P9).
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum PushTarget {
    /// A UnifiedPush endpoint: the https URL the device's distributor gave it. The
    /// relay posts a constant body to it.
    UnifiedPush {
        /// The endpoint URL.
        endpoint: String,
    },
    /// The app publisher's gateway (which holds the APNs or FCM keys), with the
    /// device's opaque token there. The relay posts `{"token": <device_token>, ...}`
    /// with every other field constant.
    Gateway {
        /// The gateway URL; the relay takes only URLs on its operator's allowlist.
        url: String,
        /// The device's token at the gateway (an APNs or FCM token, or whatever
        /// the gateway hands out).
        device_token: String,
    },
}

impl std::fmt::Debug for PushTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PushTarget::UnifiedPush { .. } => f.write_str("PushTarget::UnifiedPush(..)"),
            PushTarget::Gateway { .. } => f.write_str("PushTarget::Gateway(..)"),
        }
    }
}

impl PushTarget {
    /// The URL the relay posts to.
    pub fn url(&self) -> &str {
        match self {
            PushTarget::UnifiedPush { endpoint } => endpoint,
            PushTarget::Gateway { url, .. } => url,
        }
    }

    /// Checks the target's form: a URL of 1 to [`MAX_PUSH_URL`] bytes without
    /// control characters or spaces, a token of 1 to [`MAX_PUSH_TOKEN`] visible ASCII
    /// characters.
    pub fn check(&self) -> Result<(), Malformed> {
        let (url, field) = match self {
            PushTarget::UnifiedPush { endpoint } => (endpoint, "set_push_target.endpoint"),
            PushTarget::Gateway { url, .. } => (url, "set_push_target.url"),
        };
        text(url, field, MAX_PUSH_URL, "a URL")?;
        if let PushTarget::Gateway { device_token, .. } = self {
            text(
                device_token,
                "set_push_target.device_token",
                MAX_PUSH_TOKEN,
                "a device token",
            )?;
        }
        Ok(())
    }
}

/// 1 to `max` bytes of visible ASCII (no spaces, no control characters).
fn text(s: &str, field: &'static str, max: usize, what: &'static str) -> Result<(), Malformed> {
    let bad = ErrorCode::BadRequest;
    if s.is_empty() {
        return Err(Malformed::new(
            field,
            Problem::Missing("an empty value"),
            bad,
        ));
    }
    if s.len() > max {
        let problem = Problem::TooMany {
            what,
            got: s.len(),
            max,
        };
        return Err(Malformed::new(field, problem, bad));
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        let problem = Problem::Invalid("only visible ASCII characters are allowed");
        return Err(Malformed::new(field, problem, bad));
    }
    Ok(())
}

impl TryFrom<v1::SetPushTargetRequest> for PushTarget {
    type Error = Malformed;

    fn try_from(r: v1::SetPushTargetRequest) -> Result<Self, Malformed> {
        use v1::set_push_target_request::Target;
        let target = match r.target {
            Some(Target::UnifiedPush(t)) => PushTarget::UnifiedPush {
                endpoint: t.endpoint,
            },
            Some(Target::Gateway(t)) => PushTarget::Gateway {
                url: t.url,
                device_token: t.device_token,
            },
            None => {
                let problem = Problem::Missing("no target");
                return Err(Malformed::new(
                    "set_push_target.target",
                    problem,
                    ErrorCode::BadRequest,
                ));
            }
        };
        target.check()?;
        Ok(target)
    }
}

impl From<PushTarget> for v1::SetPushTargetRequest {
    fn from(t: PushTarget) -> Self {
        use v1::set_push_target_request::Target;
        let target = match t {
            PushTarget::UnifiedPush { endpoint } => {
                Target::UnifiedPush(v1::UnifiedPushTarget { endpoint })
            }
            PushTarget::Gateway { url, device_token } => {
                Target::Gateway(v1::GatewayPushTarget { url, device_token })
            }
        };
        v1::SetPushTargetRequest {
            target: Some(target),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unified(endpoint: &str) -> v1::SetPushTargetRequest {
        PushTarget::UnifiedPush {
            endpoint: endpoint.into(),
        }
        .into()
    }

    #[test]
    fn a_target_round_trips_and_bad_forms_are_refused() {
        let gateway = PushTarget::Gateway {
            url: "https://push.example/wake".into(),
            device_token: "abc123".into(),
        };
        let wire = v1::SetPushTargetRequest::from(gateway.clone());
        assert_eq!(PushTarget::try_from(wire), Ok(gateway.clone()));
        assert!(PushTarget::try_from(unified("https://up.example/x")).is_ok());

        let field = |r: v1::SetPushTargetRequest| PushTarget::try_from(r).map_err(|e| e.field());
        assert_eq!(field(unified("")), Err("set_push_target.endpoint"), "empty");
        let long = format!("https://up.example/{}", "a".repeat(MAX_PUSH_URL));
        assert_eq!(field(unified(&long)), Err("set_push_target.endpoint"));
        assert_eq!(
            field(unified("https://up.example/a b")),
            Err("set_push_target.endpoint"),
            "a space"
        );
        let token = |t: &str| {
            v1::SetPushTargetRequest::from(PushTarget::Gateway {
                url: "https://g.example".into(),
                device_token: t.into(),
            })
        };
        assert_eq!(field(token("")), Err("set_push_target.device_token"));
        assert_eq!(
            field(token("new\nline")),
            Err("set_push_target.device_token")
        );
        assert_eq!(
            field(token(&"t".repeat(MAX_PUSH_TOKEN + 1))),
            Err("set_push_target.device_token")
        );
        assert!(PushTarget::try_from(token(&"t".repeat(MAX_PUSH_TOKEN))).is_ok());
        assert_eq!(
            field(v1::SetPushTargetRequest { target: None }),
            Err("set_push_target.target")
        );
    }

    #[test]
    fn debug_shows_no_url_or_token() {
        let t = PushTarget::Gateway {
            url: "https://secret.example/x".into(),
            device_token: "tok-secret".into(),
        };
        let shown = format!("{t:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }
}
