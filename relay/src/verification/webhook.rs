//! The webhook verifier: `POST {url}` with `{"to": "+…", "code": "123456", "message":
//! "Your Tern code is 123456"}` (JSON) and, if configured, `Authorization: Bearer
//! <token>`. A 2xx answer means sent; redirects are not followed; `https` is
//! required unless `allow_http` is set, and then only to a loopback host. Failures
//! are logged with the status code at most, never the number.

use std::net::IpAddr;

use reqwest::Url;
use tern_proto::{Code, VerificationId, E164};
use tracing::warn;
use zeroize::Zeroizing;

use super::{SendFuture, Verifier, VerifierError};
use crate::config::WebhookConfig;
use crate::error::{Error, Result};

/// Posts codes to the operator's SMS gateway.
pub struct WebhookVerifier {
    client: reqwest::Client,
    url: Url,
    token: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for WebhookVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookVerifier").finish_non_exhaustive()
    }
}

/// Whether `url` may be used: https, or http to a loopback host when allowed.
pub(crate) fn check_url(url: &Url, allow_http: bool) -> Result<()> {
    let Some(host) = url.host_str() else {
        return Err(Error::Config("verification.webhook.url has no host".into()));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|a| a.is_loopback());
    match url.scheme() {
        "https" => Ok(()),
        "http" if allow_http && loopback => Ok(()),
        "http" if allow_http => Err(Error::Config(
            "verification.webhook.allow_http is only for a loopback host".into(),
        )),
        _ => Err(Error::Config(
            "verification.webhook.url must be https (or http to loopback with allow_http)".into(),
        )),
    }
}

impl WebhookVerifier {
    /// Checks the URL and reads the token file.
    pub fn new(config: &WebhookConfig) -> Result<Self> {
        let url = Url::parse(&config.url)
            .map_err(|e| Error::Config(format!("verification.webhook.url: {e}")))?;
        check_url(&url, config.allow_http)?;
        let token = match &config.bearer_token_file {
            Some(path) => {
                let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                    Error::Config(format!("verification.webhook.bearer_token_file: {e}"))
                })?);
                Some(Zeroizing::new(text.trim().to_owned()))
            }
            None => None,
        };
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // Proxy variables of the environment would carry a loopback http
            // gateway's numbers off the machine: the URL configured is the only hop.
            .no_proxy()
            .timeout(config.timeout)
            .build()
            .map_err(|e| Error::Config(format!("verification.webhook: {e}")))?;
        Ok(WebhookVerifier { client, url, token })
    }

    async fn post(&self, number: &E164, code: &Code) -> Result<(), VerifierError> {
        let body = Zeroizing::new(
            serde_json::json!({
                "to": number.as_str(),
                "code": code.as_str(),
                "message": format!("Your Tern code is {}", code.as_str()),
            })
            .to_string(),
        );
        let mut request = (self.client.post(self.url.clone()))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.as_bytes().to_vec());
        if let Some(token) = &self.token {
            request = request.bearer_auth(token.as_str());
        }
        match request.send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => {
                let status = r.status().as_u16();
                warn!(status, "verification webhook refused a code");
                Err(VerifierError::Rejected(status))
            }
            Err(e) if e.is_timeout() => {
                warn!("verification webhook timed out");
                Err(VerifierError::Timeout)
            }
            Err(_) => {
                // The error's text may hold the URL; the URL holds no number, but
                // keep the line minimal all the same.
                warn!("verification webhook unreachable");
                Err(VerifierError::Unreachable)
            }
        }
    }
}

impl Verifier for WebhookVerifier {
    fn send_code<'a>(
        &'a self,
        number: &'a E164,
        code: &'a Code,
        _session: &'a VerificationId,
    ) -> SendFuture<'a> {
        Box::pin(self.post(number, code))
    }
}
