//! `tern-relay admin rotate-cert`: stages the relay's next certificate
//! (`crate::net::rotation`). `POST /admin/rotate-cert` with a JSON [`RotateRequest`];
//! the answer is a [`Rotated`]. On a stopped relay the command stages it in the data
//! directory directly, and the relay announces it from its next start.

use std::path::PathBuf;
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tern_platform::clock::{Clock, SystemClock};

use super::server::{failed, json, Admin, Body};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::media::bytes::hex;
use crate::net::rotation::{Certificates, Source, Staged, DEFAULT_OVERLAP};

/// The largest request body the route reads.
const MAX_BODY: usize = 16 * 1024;

/// What `rotate-cert` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RotateRequest {
    /// Seconds until the staged certificate is served (default 14 days).
    pub overlap_secs: Option<u64>,
    /// Or the switch time itself (Unix ms): the same on every node of a relay.
    pub switch_at_ms: Option<u64>,
    /// The operator's new certificate chain (PEM), read by the relay; with `key`.
    /// Without both, a new self-signed certificate is made.
    pub cert: Option<PathBuf>,
    /// The operator's new private key (PEM).
    pub key: Option<PathBuf>,
    /// Stage in place of a certificate already staged.
    pub replace: bool,
}

/// What was staged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotated {
    /// Hex SHA-256 of the certificate served now.
    pub current: String,
    /// Hex SHA-256 of the staged one.
    pub next: String,
    /// When the staged one is served (Unix ms).
    pub switch_at_ms: u64,
}

impl From<Staged> for Rotated {
    fn from(s: Staged) -> Self {
        Rotated {
            current: hex(&s.current.0),
            next: hex(&s.next.fingerprint.0),
            switch_at_ms: s.next.switch_at_ms,
        }
    }
}

/// The furthest a switch may be staged (and what the command can still print).
pub(crate) const MAX_OVERLAP: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);

impl RotateRequest {
    /// The source and switch time it names, at `now`.
    fn resolve(&self, now: u64) -> Result<(Source, u64)> {
        let source = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Source::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            (None, None) => Source::Generate,
            _ => return Err(Error::BadRequest("--cert and --key go together".into())),
        };
        let at = match (self.overlap_secs, self.switch_at_ms) {
            (Some(_), Some(_)) => {
                return Err(Error::BadRequest(
                    "give an overlap or a switch time, not both".into(),
                ))
            }
            (None, Some(at)) if at <= now => return Err(Error::BadRequest(
                "the switch time has passed: clients would have no time to learn the certificate"
                    .into(),
            )),
            (None, Some(at)) => at,
            (overlap, None) => {
                let secs = overlap.unwrap_or(DEFAULT_OVERLAP.as_secs());
                if secs == 0 {
                    return Err(Error::BadRequest(
                        "an overlap of 0 gives clients no time to learn the certificate".into(),
                    ));
                }
                now.saturating_add(secs.saturating_mul(1000))
            }
        };
        if at - now > MAX_OVERLAP.as_millis() as u64 {
            return Err(Error::BadRequest(format!(
                "the switch is more than {} days away: stage a certificate nearer its use",
                MAX_OVERLAP.as_secs() / 86_400
            )));
        }
        Ok((source, at))
    }
}

/// Stages what `request` names on `certs`.
fn stage(certs: &Certificates, request: &RotateRequest, now: u64) -> Result<Rotated> {
    let (source, at) = request.resolve(now)?;
    certs.stage(&source, at, request.replace).map(Rotated::from)
}

/// `POST /admin/rotate-cert`.
pub(super) async fn route(admin: &Arc<Admin>, req: Request<Incoming>) -> Response<Body> {
    crate::metrics::admin_request("rotate_cert");
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return failed(&Error::BadRequest(format!("the request body: {e}"))),
    };
    let request: RotateRequest = if body.is_empty() {
        RotateRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return failed(&Error::BadRequest(format!("the request body: {e}"))),
        }
    };
    let (certs, now) = (admin.certificates.clone(), admin.services.clock().now());
    let staged = tokio::task::spawn_blocking(move || stage(&certs, &request, now)).await;
    match staged {
        Ok(Ok(r)) => json(StatusCode::OK, &serde_json::to_value(r).unwrap_or_default()),
        Ok(Err(e)) => failed(&e),
        Err(_) => failed(&Error::Config("staging failed".into())),
    }
}

/// `rotate-cert` on a stopped relay's data directory (its stores are opened, so a
/// relay running on it refuses this; it announces the certificate from its start).
pub async fn rotate_offline(config: &Config, request: &RotateRequest) -> Result<Rotated> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let stores = crate::server::open_stores(config, clock.as_ref())?;
    let certs = Certificates::open(&config.tls, &config.data_dir, clock.clone())?;
    let staged = stage(&certs, request, clock.now());
    drop(stores);
    staged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_names_one_switch_time_and_both_files_or_neither() {
        let now = 1_000_000;
        let default = RotateRequest::default().resolve(now).expect("default");
        assert!(matches!(default.0, Source::Generate));
        assert_eq!(default.1, now + DEFAULT_OVERLAP.as_secs() * 1000);
        let both = RotateRequest {
            overlap_secs: Some(5),
            switch_at_ms: Some(now + 1),
            ..RotateRequest::default()
        };
        let half = RotateRequest {
            cert: Some("c.pem".into()),
            ..RotateRequest::default()
        };
        let past = RotateRequest {
            switch_at_ms: Some(now),
            ..RotateRequest::default()
        };
        let zero = RotateRequest {
            overlap_secs: Some(0),
            ..RotateRequest::default()
        };
        let far = RotateRequest {
            overlap_secs: Some(10_000 * 365 * 24 * 3600),
            ..RotateRequest::default()
        };
        let far_at = RotateRequest {
            switch_at_ms: Some(u64::MAX),
            ..RotateRequest::default()
        };
        for bad in [both, half, past, zero, far, far_at] {
            assert!(
                matches!(bad.resolve(now), Err(Error::BadRequest(_))),
                "{bad:?}"
            );
        }
        let at = RotateRequest {
            switch_at_ms: Some(now + 5),
            ..RotateRequest::default()
        };
        assert_eq!(at.resolve(now).expect("at").1, now + 5);
    }
}
