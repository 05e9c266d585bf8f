//! What every node runs in the background: the free-disk sampling and the expiry
//! sweep (on shared stores, only on the holder of the sweep lease).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::{Services, RETRIES_PER_SWEEP};
use crate::core::budget::{Budget, DiskSample};
use crate::deletion::{AccountDeletion, DeviceRemoval};
use crate::error::Error;
use crate::media::BlobStore;

/// Samples the data file systems into `budget`; a directory not there yet (no blob
/// stored) or a failed sample is skipped.
pub(super) fn record_disk(budget: &Budget, dirs: &[std::path::PathBuf]) {
    let samples: Vec<DiskSample> = dirs
        .iter()
        .filter(|d| d.exists())
        .filter_map(|d| crate::store::disk_sample(d).ok())
        .collect();
    let was = budget.below_reserve();
    let below = budget.record_disk(&samples);
    if below && !was {
        warn!("free disk space is at the reserve: sends, uploads, registrations and key uploads are refused until it is back");
    } else if was && !below {
        info!("free disk space is above the reserve again");
    }
}

pub(super) async fn disk_loop(
    budget: Arc<Budget>,
    dirs: [std::path::PathBuf; 3],
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => record_disk(&budget, &dirs),
        }
    }
}

pub(super) async fn sweep_loop(
    services: Arc<Services>,
    blobs: Arc<BlobStore>,
    deletion: Arc<AccountDeletion>,
    removal: Arc<DeviceRemoval>,
    every: Duration,
    batch: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        // Per node: rate limit keys whose buckets refilled (the limits are per node).
        // And blob bytes in a shared store, as the index counts them now.
        let (per_node, counted) = (services.clone(), blobs.clone());
        let _ = tokio::task::spawn_blocking(move || {
            per_node.rates.housekeep();
            per_node.provisioning.housekeep();
            counted.recount()
        })
        .await;
        // What the stores hold is swept by one node at a time, when several share
        // them: the holder of the lease (renewed each pass, lapsing after three).
        if !holds_sweep_lease(&services, every).await {
            continue;
        }
        crate::metrics::sweep();
        // Deletions that failed part way (they log their own failures).
        if let Err(e) = deletion.sweep(RETRIES_PER_SWEEP).await {
            warn!(error = %e, "pending account deletions not read");
        }
        sweep_devices(&services, &removal, batch).await;
        // Group handles idle past `group_idle_days` (counts only, P9).
        let groups = services.clone();
        match tokio::task::spawn_blocking(move || groups.groups().sweep(batch)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(groups = n, "deleted idle group handles"),
            Ok(Err(e)) => warn!(error = %e, "group sweep failed"),
            Err(e) => warn!(error = %e, "group sweep panicked"),
        }
        let services = services.clone();
        let swept = tokio::task::spawn_blocking(move || {
            let mut total = 0;
            loop {
                let n = services.mailboxes.sweep(batch)?;
                total += n;
                if n < batch as u64 {
                    return Ok::<_, Error>(total);
                }
            }
        })
        .await;
        match swept {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                crate::metrics::expired(crate::metrics::Expired::Messages, n);
                info!(messages = n, "deleted expired messages");
            }
            Ok(Err(e)) => warn!(error = %e, "expiry sweep failed"),
            Err(e) => warn!(error = %e, "expiry sweep panicked"),
        }
        let blobs = blobs.clone();
        let swept = tokio::task::spawn_blocking(move || blobs.sweep(batch)).await;
        match swept {
            Ok(Ok(s)) if s.blobs + s.uploads + s.objects > 0 => {
                crate::metrics::expired(crate::metrics::Expired::Blobs, s.blobs);
                crate::metrics::expired(crate::metrics::Expired::Uploads, s.uploads);
                info!(
                    blobs = s.blobs,
                    uploads = s.uploads,
                    objects = s.objects,
                    "deleted expired media"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "media sweep failed"),
            Err(e) => warn!(error = %e, "media sweep panicked"),
        }
    }
}

/// Idle linked devices removed per sweep, at most.
const IDLE_REMOVALS_PER_SWEEP: usize = 100;

/// The sweeper's device work: removals that failed part way, linked devices idle
/// past `linked_device_idle_days` (at most [`IDLE_REMOVALS_PER_SWEEP`] a pass), expired provisioning
/// slots. Counts only are logged (P9).
async fn sweep_devices(services: &Arc<Services>, removal: &DeviceRemoval, batch: usize) {
    if let Err(e) = removal.sweep(RETRIES_PER_SWEEP).await {
        warn!(error = %e, "pending device removals not read");
    }
    // Each removal flushes three times: a small share per pass keeps the expiry sweep
    // (and the lease's renewals) on time after an upgrade finds many idle at once.
    match removal
        .remove_idle(batch.min(IDLE_REMOVALS_PER_SWEEP))
        .await
    {
        Ok(0) => {}
        Ok(n) => info!(devices = n, "removed idle linked devices"),
        Err(e) => warn!(error = %e, "idle device sweep failed"),
    }
    let services = services.clone();
    match tokio::task::spawn_blocking(move || services.provisioning.sweep(batch)).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::debug!(slots = n, "deleted expired provisioning slots"),
        Ok(Err(e)) => warn!(error = %e, "provisioning sweep failed"),
        Err(e) => warn!(error = %e, "provisioning sweep panicked"),
    }
}

/// The name of the lease whose holder sweeps the shared stores.
pub(crate) const SWEEP_LEASE: &str = "sweep";

/// Whether this node sweeps now: always on its own stores; on shared ones, when it
/// holds (or takes) the sweep lease, for three sweep intervals.
async fn holds_sweep_lease(services: &Services, every: Duration) -> bool {
    let Some(pg) = services.stores.shared.clone() else {
        return true;
    };
    let held = tokio::task::spawn_blocking(move || pg.try_hold(SWEEP_LEASE, every * 3)).await;
    match held {
        Ok(Ok(held)) => held,
        // An outage is logged once by the store, not once per sweep.
        Ok(Err(e @ crate::store::StoreError::Unavailable(_))) => {
            tracing::debug!(error = %e, "the sweep lease could not be read; skipping this sweep");
            false
        }
        Ok(Err(e)) => {
            warn!(error = %e, "the sweep lease could not be read; skipping this sweep");
            false
        }
        Err(_) => false,
    }
}
