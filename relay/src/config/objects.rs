//! `[objects]`: blob bytes in an S3-compatible object store instead of files under
//! the data directory (the default). See `media/bytes/s3.rs` and ARCHITECTURE.md
//! ("Media").

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::media::S3Settings;

/// S3's smallest part but the last, MiB.
const MIN_PART_MB: u64 = 5;
/// The largest part taken here, MiB (one is buffered per running upload).
pub(crate) const MAX_PART_MB: u64 = 256;
/// The largest node-wide upload buffer taken here, MiB (64 GiB).
const MAX_BUFFER_MB: u64 = 65_536;

/// Where blob bytes live.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectsConfig {
    /// `s3://<bucket>`; absent: files under the data directory.
    pub url: Option<String>,
    /// The S3 endpoint (`https://…`); absent: AWS for `region`.
    pub endpoint: Option<String>,
    /// The region.
    pub region: String,
    /// The environment variable holding the access key id.
    pub access_key_env: String,
    /// The environment variable holding the secret access key (never in the file).
    pub secret_key_env: String,
    /// Whether an `http://` endpoint is allowed.
    pub allow_http: bool,
    /// Upload bytes sent as one part, MiB (at least 5, S3's minimum).
    pub part_mb: u64,
    /// Upload bytes one node buffers at most over all uploads, MiB, in parts of
    /// `part_mb` (at least one part). An upload that would need more is refused with
    /// UNAVAILABLE and retry advice.
    pub buffer_mb: u64,
    /// The deadline of each request to the object store: a part, a chunk of a read,
    /// a manifest. A completion or server-side copy gets one second more per 16 MiB
    /// of the blob.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

impl Default for ObjectsConfig {
    fn default() -> Self {
        ObjectsConfig {
            url: None,
            endpoint: None,
            region: "us-east-1".into(),
            access_key_env: "TERN_S3_ACCESS_KEY".into(),
            secret_key_env: "TERN_S3_SECRET_KEY".into(),
            allow_http: false,
            part_mb: 8,
            buffer_mb: 256,
            timeout: Duration::from_secs(30),
        }
    }
}

impl ObjectsConfig {
    /// The bucket named by `url`, if it is set.
    fn bucket(&self) -> Result<Option<&str>> {
        let Some(url) = &self.url else {
            return Ok(None);
        };
        match url.strip_prefix("s3://") {
            Some(b) if !b.is_empty() && !b.contains('/') => Ok(Some(b)),
            _ => Err(Error::Config(
                "objects.url must be s3://<bucket> (no path)".into(),
            )),
        }
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_owned()));
        self.bucket()?;
        if !(MIN_PART_MB..=MAX_PART_MB).contains(&self.part_mb) {
            return bad("objects.part_mb must be from 5 to 256");
        }
        if !(self.part_mb..=MAX_BUFFER_MB).contains(&self.buffer_mb) {
            return bad("objects.buffer_mb must be at least objects.part_mb and at most 65536");
        }
        if self.timeout < Duration::from_millis(100) {
            return bad("objects.timeout must be at least 100ms");
        }
        if self.region.is_empty()
            || self.access_key_env.is_empty()
            || self.secret_key_env.is_empty()
        {
            return bad("objects.region, access_key_env and secret_key_env must not be empty");
        }
        match &self.endpoint {
            Some(e) if e.starts_with("http://") && !self.allow_http => {
                bad("objects.endpoint is http://: set objects.allow_http = true to allow it")
            }
            Some(e) if !e.starts_with("http://") && !e.starts_with("https://") => {
                bad("objects.endpoint must be an http:// or https:// URL")
            }
            _ => Ok(()),
        }
    }

    /// How to reach the object store, with the keys read from the environment; `None`
    /// when blob bytes stay in files.
    pub(crate) fn settings(&self) -> Result<Option<S3Settings>> {
        self.validate()?;
        let Some(bucket) = self.bucket()? else {
            return Ok(None);
        };
        let env = |name: &str| {
            std::env::var(name).map_err(|_| {
                Error::Config(format!(
                    "objects: the environment variable {name} (the object store's key) is not set"
                ))
            })
        };
        Ok(Some(S3Settings {
            bucket: bucket.to_owned(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            access_key: env(&self.access_key_env)?,
            secret_key: env(&self.secret_key_env)?,
            allow_http: self.allow_http,
            part_bytes: usize::try_from(self.part_mb << 20)
                .map_err(|_| Error::Config("objects.part_mb is too large".into()))?,
            buffer_bytes: self.buffer_mb << 20,
            timeout: self.timeout,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ObjectsConfig> {
        let c: ObjectsConfig = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn absent_means_files_and_values_are_checked() {
        let c = parse("").expect("default");
        assert!(c.settings().expect("settings").is_none());
        let ok = parse(
            "url = \"s3://tern\"\nendpoint = \"http://127.0.0.1:9000\"\nallow_http = true\n\
             part_mb = 5",
        )
        .expect("valid");
        assert_eq!(ok.bucket().expect("bucket"), Some("tern"));
        assert_eq!(parse("").expect("default").buffer_mb, 256);
        assert!(
            parse("part_mb = 64\nbuffer_mb = 32").is_err(),
            "below one part"
        );
        for bad in [
            "url = \"https://tern\"",
            "url = \"s3://\"",
            "url = \"s3://tern/sub\"",
            "part_mb = 4",
            "part_mb = 1024",
            "endpoint = \"http://127.0.0.1:9000\"",
            "endpoint = \"ftp://x\"",
            "timeout = \"0s\"",
            "buffer_mb = 4",
            "buffer_mb = 1000000",
            "secret_key_env = \"\"",
            "secret_key = \"inline\"",
        ] {
            assert!(parse(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn missing_keys_name_the_variable() {
        let c = parse(
            "url = \"s3://tern\"\naccess_key_env = \"TERN_TEST_NO_SUCH_VAR_1\"\n\
             secret_key_env = \"TERN_TEST_NO_SUCH_VAR_2\"",
        )
        .expect("valid");
        let e = c.settings().expect_err("no keys").to_string();
        assert!(e.contains("TERN_TEST_NO_SUCH_VAR_1"), "{e}");
    }
}
