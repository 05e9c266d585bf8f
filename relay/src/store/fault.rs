//! Test-only fault injection: makes chosen writes fail with ENOSPC, so the relay's
//! handling of a full disk runs in a real process without filling a real disk.
//!
//! Compiled in only for unit tests and with the cargo feature `fault-injection`. The
//! end-to-end tests' relay binary has it, and so does any build that includes the
//! `tests` crate (`--workspace`: cargo unifies features); `cargo build -p tern-relay`
//! and a plain `cargo build` at the root (the default members leave `tests` out) do
//! not. A relay without it refuses to start when `TERN_FAULTS` is set (see
//! [`refuse_unless_compiled_in`]); one with it warns at start when a plan is set.
//!
//! `TERN_FAULTS` holds a plan, or `file:<path>` naming a file that holds one and is
//! read again at every write it covers (no file, or an empty one: no faults), so a
//! test arms and clears faults while the relay runs. A plan is a comma-separated
//! list of `<site>=enospc`, each optionally with `@after:<n>`: the first `n` writes
//! at that site (counted from the start of the process) succeed, later ones fail.
//! Sites: `log_append` (the mailbox log's append), `blob_write` (an upload's bytes),
//! `account_deletion` (between an account deletion's first and second removal),
//! `mailbox_read` (a delivery reading the mailbox: a database that fails a read),
//! `backup_write` (a backup writing a mailbox log segment or a file of its own).
//! Example: `TERN_FAULTS=log_append=enospc@after:100,blob_write=enospc`.

use std::io;

/// Where a fault can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Site {
    /// The mailbox log writing a send's records.
    LogAppend,
    /// The media service writing an upload's bytes.
    BlobWrite,
    /// Account deletion, after its first store removal (a device's keys): a failure
    /// here leaves a half-done deletion for the next start to finish.
    AccountDeletion,
    /// A delivery reading the device's mailbox (`Mailboxes::pull`).
    MailboxRead,
    /// A backup writing into its directory (`store::backup`).
    BackupWrite,
}

/// The environment variable that holds the plan.
pub const VAR: &str = "TERN_FAULTS";

/// Whether this build has fault injection.
pub const COMPILED_IN: bool = cfg!(any(test, feature = "fault-injection"));

/// For the command line: an error if `TERN_FAULTS` is set in a build without fault
/// injection (it would be ignored, and a test would pass for the wrong reason) or
/// holds a plan that does not parse.
pub fn refuse_unless_compiled_in() -> Result<(), String> {
    let Some(value) = std::env::var_os(VAR) else {
        return Ok(());
    };
    parse_at_start(&value.to_string_lossy())
}

#[cfg(any(test, feature = "fault-injection"))]
fn parse_at_start(value: &str) -> Result<(), String> {
    if value.strip_prefix("file:").is_none() {
        enabled::Plan::parse(value)?;
    }
    Ok(())
}

#[cfg(not(any(test, feature = "fault-injection")))]
fn parse_at_start(_value: &str) -> Result<(), String> {
    Err(format!(
        "{VAR} is set, but this relay was built without the fault-injection feature"
    ))
}

/// Fails with ENOSPC if the plan says this write at `site` fails.
#[cfg(any(test, feature = "fault-injection"))]
pub(crate) fn check(site: Site) -> io::Result<()> {
    enabled::check(site)
}

/// Fault injection is not compiled in: every write goes ahead.
#[cfg(not(any(test, feature = "fault-injection")))]
#[inline(always)]
pub(crate) fn check(_site: Site) -> io::Result<()> {
    Ok(())
}

#[cfg(any(test, feature = "fault-injection"))]
mod enabled {
    use std::io;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::{Site, VAR};

    /// Writes seen per site, for `@after:n`.
    static CALLS: [AtomicU64; 5] = [
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    ];

    fn index(site: Site) -> usize {
        match site {
            Site::LogAppend => 0,
            Site::BlobWrite => 1,
            Site::AccountDeletion => 2,
            Site::MailboxRead => 3,
            Site::BackupWrite => 4,
        }
    }

    /// A parsed plan: for each site, `Some(n)` fails every write after the first `n`.
    #[derive(Debug, Default, PartialEq, Eq)]
    pub(super) struct Plan {
        after: [Option<u64>; 5],
    }

    impl Plan {
        pub(super) fn parse(text: &str) -> Result<Plan, String> {
            let mut plan = Plan::default();
            for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (site, rest) = part
                    .split_once('=')
                    .ok_or_else(|| format!("{VAR}: {part:?} is not <site>=enospc"))?;
                let site = match site.trim() {
                    "log_append" => Site::LogAppend,
                    "blob_write" => Site::BlobWrite,
                    "account_deletion" => Site::AccountDeletion,
                    "mailbox_read" => Site::MailboxRead,
                    "backup_write" => Site::BackupWrite,
                    other => return Err(format!("{VAR}: unknown site {other:?}")),
                };
                let (kind, after) = match rest.split_once('@') {
                    Some((kind, when)) => {
                        let n = when
                            .strip_prefix("after:")
                            .and_then(|n| n.parse().ok())
                            .ok_or_else(|| format!("{VAR}: {when:?} is not after:<n>"))?;
                        (kind, n)
                    }
                    None => (rest, 0),
                };
                if kind.trim() != "enospc" {
                    return Err(format!("{VAR}: only enospc can be injected, not {kind:?}"));
                }
                plan.after[index(site)] = Some(after);
            }
            Ok(plan)
        }

        /// Whether the write at `site` that is number `call` (from 0) fails.
        pub(super) fn fails(&self, site: Site, call: u64) -> bool {
            self.after[index(site)].is_some_and(|n| call >= n)
        }
    }

    fn current() -> Plan {
        let Ok(value) = std::env::var(VAR) else {
            return Plan::default();
        };
        let text = match value.strip_prefix("file:") {
            Some(path) => std::fs::read_to_string(path).unwrap_or_default(),
            None => value,
        };
        // Checked at start (`refuse_unless_compiled_in`); a file written badly
        // later injects nothing.
        Plan::parse(&text).unwrap_or_default()
    }

    pub(super) fn check(site: Site) -> io::Result<()> {
        if std::env::var_os(VAR).is_none() {
            return Ok(());
        }
        let call = CALLS[index(site)].fetch_add(1, Ordering::Relaxed);
        if current().fails(site, call) {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::NOSPC.raw_os_error(),
            ));
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn parses_plans_and_refuses_bad_ones() {
            let p = Plan::parse("log_append=enospc@after:2, blob_write=enospc").expect("parses");
            let r = Plan::parse("mailbox_read=enospc").expect("parses");
            assert!(r.fails(Site::MailboxRead, 0) && !r.fails(Site::LogAppend, 0));
            assert!(!p.fails(Site::LogAppend, 1));
            assert!(p.fails(Site::LogAppend, 2));
            assert!(p.fails(Site::BlobWrite, 0));
            assert_eq!(Plan::parse("").expect("empty"), Plan::default());
            assert!(!Plan::default().fails(Site::LogAppend, 1000));
            for bad in [
                "log_append",
                "disk=enospc",
                "log_append=eio",
                "log_append=enospc@after:x",
                "log_append=enospc@before:3",
            ] {
                assert!(Plan::parse(bad).is_err(), "{bad}");
            }
        }

        #[test]
        fn an_injected_fault_is_enospc() {
            let e = io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error());
            assert!(crate::store::is_no_space(&e));
        }
    }
}
