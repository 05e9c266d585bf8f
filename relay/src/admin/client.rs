//! The command line's side of the admin interface: finds the relay running on a
//! data directory (the address in its `admin.addr`, trusted only while the
//! directory's lock is held: [`super::lock`]) and calls its admin listener with the token from
//! `admin.token`. See `super::server` for the requests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tern_proto::AccountId;

use super::token::{read_token, ADDR_FILE, TOKEN_FILE};
use super::DeviceRow;
use crate::metrics::Sample;

/// How long connecting to the admin listener may take.
const CONNECT_WITHIN: Duration = Duration::from_secs(5);
/// How long a command other than an export may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(120);

/// A failed admin call, as the command line reports it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The relay answered with a refusal or an error.
    #[error("the running relay answered {status}: {message}")]
    Answered {
        /// The HTTP status.
        status: u16,
        /// What the relay said.
        message: String,
    },
    /// Nothing answered at the address.
    #[error("no relay answers at {0}")]
    NotRunning(String),
    /// The request failed on the way.
    #[error("admin request to {url}: {error}")]
    Transport {
        /// The address called.
        url: String,
        /// What failed.
        error: String,
    },
    /// Writing the answer out failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A running relay's admin listener.
#[derive(Debug)]
pub struct Online {
    base: String,
    /// `None` when the token file could not be read: requests go without one and
    /// are refused, which the relay counts.
    token: Option<String>,
    token_path: PathBuf,
    client: reqwest::Client,
}

impl Online {
    /// The running relay of `data_dir` (from its `admin.addr`), or the listener at
    /// `url` when given (with `token_file`: the caller requires it); `None` when the
    /// data directory names none (no relay runs there, or it runs without an admin
    /// listener). An `admin.addr` in a data directory whose lock nobody holds is a
    /// crashed relay's and is not called: the token goes nowhere it names. The
    /// token is read from `token_file`, else from the data directory's `admin.token`.
    pub fn locate(
        data_dir: &Path,
        url: Option<&str>,
        token_file: Option<&Path>,
    ) -> Result<Option<Online>, ClientError> {
        let base = match url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None if !super::lock::held(data_dir)? => return Ok(None),
            None => match std::fs::read_to_string(data_dir.join(ADDR_FILE)) {
                Ok(addr) => format!("http://{}", addr.trim()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e.into()),
            },
        };
        let token_path = token_file.map_or_else(|| data_dir.join(TOKEN_FILE), Path::to_path_buf);
        let token = match token_file {
            Some(f) => std::fs::read_to_string(f).ok().map(|t| t.trim().to_owned()),
            None => read_token(data_dir).ok(),
        };
        let client = reqwest::Client::builder()
            // The token goes only where admin.addr / --admin-url point, never to an
            // HTTP_PROXY of the environment; nor does a redirect carry it elsewhere.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_WITHIN)
            .build()
            .map_err(|e| ClientError::Transport {
                url: base.clone(),
                error: e.to_string(),
            })?;
        Ok(Some(Online {
            base,
            token,
            token_path,
            client,
        }))
    }

    /// Calls `path` (with a JSON `body` if any); the answer when it is a success.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        timeout: Option<Duration>,
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::Response, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.client.request(method, &url);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        if let Some(t) = &self.token {
            request = request.bearer_auth(t);
        }
        if let Some(t) = timeout {
            request = request.timeout(t);
        }
        let response = request.send().await.map_err(|e| {
            if e.is_connect() {
                ClientError::NotRunning(self.base.clone())
            } else {
                ClientError::Transport {
                    url: url.clone(),
                    error: e.to_string(),
                }
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        let mut message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(body)
            .trim()
            .to_owned();
        if status == reqwest::StatusCode::UNAUTHORIZED && self.token.is_none() {
            message = format!(
                "{message} ({} could not be read: run as a user who may read the data directory)",
                self.token_path.display()
            );
        }
        Err(ClientError::Answered {
            status: status.as_u16(),
            message,
        })
    }

    async fn json(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<serde_json::Value, ClientError> {
        let response = self.call(method, path, Some(ANSWER_WITHIN), None).await?;
        let url = format!("{}{path}", self.base);
        let body = response.bytes().await.map_err(|e| ClientError::Transport {
            url: url.clone(),
            error: e.to_string(),
        })?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Transport {
            url,
            error: e.to_string(),
        })
    }

    /// `stats`: every sample the metrics show.
    pub async fn stats(&self) -> Result<Vec<Sample>, ClientError> {
        let v = self.json(reqwest::Method::GET, "/admin/stats").await?;
        Ok(v["samples"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| Sample {
                        name: s["name"].as_str().unwrap_or_default().to_owned(),
                        labels: s["labels"].as_str().unwrap_or_default().to_owned(),
                        value: s["value"].as_f64().unwrap_or(f64::NAN),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `list-devices`.
    pub async fn list_devices(&self, account: &AccountId) -> Result<Vec<DeviceRow>, ClientError> {
        let path = format!("/admin/accounts/{}/devices", hex(account));
        let v = self.json(reqwest::Method::GET, &path).await?;
        serde_json::from_value(v["devices"].clone()).map_err(|e| ClientError::Transport {
            url: path,
            error: e.to_string(),
        })
    }

    /// `delete-account`: (devices, messages, uploads) deleted.
    pub async fn delete_account(
        &self,
        account: &AccountId,
    ) -> Result<(u64, u64, u64), ClientError> {
        let path = format!("/admin/accounts/{}/delete", hex(account));
        let v = self.json(reqwest::Method::POST, &path).await?;
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        Ok((n("devices"), n("messages"), n("uploads")))
    }

    /// `reload`: the keys put in force.
    pub async fn reload(&self) -> Result<Vec<String>, ClientError> {
        let v = self.json(reqwest::Method::POST, "/admin/reload").await?;
        Ok(v["reloaded"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `backup`: writes a backup into `dir` (a new directory, on the relay's
    /// machine), answering once it is complete; what was written.
    pub async fn backup(&self, dir: &Path) -> Result<crate::store::backup::BackedUp, ClientError> {
        let url = format!("{}/admin/backup", self.base);
        let dir = dir.to_str().ok_or_else(|| ClientError::Transport {
            url: url.clone(),
            error: format!("{} is not UTF-8", dir.display()),
        })?;
        let body = serde_json::json!({ "dir": dir }).to_string();
        let response = self
            .call(
                reqwest::Method::POST,
                "/admin/backup",
                None,
                Some(body.into_bytes()),
            )
            .await?;
        let body = response.bytes().await.map_err(|e| ClientError::Transport {
            url: url.clone(),
            error: e.to_string(),
        })?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| ClientError::Transport {
                url,
                error: e.to_string(),
            })?;
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        Ok(crate::store::backup::BackedUp {
            records: n("records"),
            segments: usize::try_from(n("segments")).unwrap_or(usize::MAX),
            blobs: n("blobs"),
            linked: n("linked"),
        })
    }

    /// `export-account`: writes the export to `out` as it arrives; the bytes written.
    /// A response cut short is an error (the relay failed part way).
    pub async fn export_account(
        &self,
        account: &AccountId,
        ciphertexts: bool,
        out: &mut dyn std::io::Write,
    ) -> Result<u64, ClientError> {
        let query = if ciphertexts { "?ciphertexts=true" } else { "" };
        let path = format!("/admin/accounts/{}/export{query}", hex(account));
        let mut response = self.call(reqwest::Method::GET, &path, None, None).await?;
        let mut written = 0u64;
        loop {
            let chunk = response.chunk().await.map_err(|e| ClientError::Transport {
                url: path.clone(),
                error: format!("the export was cut short: {e}"),
            })?;
            let Some(chunk) = chunk else { break };
            out.write_all(&chunk)?;
            written += chunk.len() as u64;
        }
        out.flush()?;
        Ok(written)
    }

    // rotate-cert (engineer cert): one block, kept last.
    /// `rotate-cert`: what the relay staged.
    pub async fn rotate_cert(
        &self,
        request: &super::rotate::RotateRequest,
    ) -> Result<super::rotate::Rotated, ClientError> {
        let path = "/admin/rotate-cert";
        let transport = |e: &dyn std::fmt::Display| ClientError::Transport {
            url: format!("{}{path}", self.base),
            error: e.to_string(),
        };
        let body = serde_json::to_vec(request).map_err(|e| transport(&e))?;
        let response = self
            .call(reqwest::Method::POST, path, Some(ANSWER_WITHIN), Some(body))
            .await?;
        let answer = response.bytes().await.map_err(|e| transport(&e))?;
        serde_json::from_slice(&answer).map_err(|e| transport(&e))
    }
}

fn hex(account: &AccountId) -> String {
    account
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A UTC day number (days since 1970-01-01) as `YYYY-MM-DD`.
pub fn date(day: u32) -> String {
    // Howard Hinnant's civil_from_days.
    let z = i64::from(day) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The samples as a table: one line per series, histogram buckets left out (their
/// `_sum` and `_count` stay).
pub fn table(samples: &[Sample]) -> String {
    let rows: Vec<(String, String)> = samples
        .iter()
        .filter(|s| !s.name.ends_with("_bucket"))
        .map(|s| {
            let series = if s.labels.is_empty() {
                s.name.clone()
            } else {
                format!("{}{{{}}}", s.name, s.labels)
            };
            (series, format_value(s.value))
        })
        .collect();
    let width = rows.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(s, v)| format!("{s:<width$}  {v}\n"))
        .collect()
}

fn format_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.6}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_dates() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(11_016), "2000-02-29");
        assert_eq!(date(20_422), "2025-11-30");
    }

    #[test]
    fn the_table_leaves_out_buckets_and_aligns() {
        let s = |name: &str, labels: &str, value| Sample {
            name: name.into(),
            labels: labels.into(),
            value,
        };
        let t = table(&[
            s("tern_sends_total", "kind=\"direct\"", 3.0),
            s("tern_fsync_seconds_bucket", "le=\"0.1\"", 1.0),
            s("tern_fsync_seconds_sum", "", 0.25),
        ]);
        assert_eq!(
            t,
            "tern_sends_total{kind=\"direct\"}  3\ntern_fsync_seconds_sum           0.250000\n"
        );
    }

    #[test]
    fn no_address_file_is_no_running_relay() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(Online::locate(dir.path(), None, None)
            .expect("locate")
            .is_none());
    }

    #[test]
    fn an_address_file_is_trusted_only_while_the_lock_is_held() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(ADDR_FILE), "127.0.0.1:9").expect("addr");
        // A relay on PostgreSQL leaves an unlocked db/ behind after a migration: the
        // directory's own lock, not sled's, says whether a relay runs.
        let db = crate::store::SledStore::open(&dir.path().join("db"), 1 << 20).expect("sled");
        drop(db);
        assert!(Online::locate(dir.path(), None, None)
            .expect("locate")
            .is_none());
        let lock = super::super::lock::DirLock::take(dir.path()).expect("lock");
        assert!(Online::locate(dir.path(), None, None)
            .expect("locate")
            .is_some());
        drop(lock);
        // A crashed relay's address: not called.
        assert!(Online::locate(dir.path(), None, None)
            .expect("locate")
            .is_none());
    }
}
