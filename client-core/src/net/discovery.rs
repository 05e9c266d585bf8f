//! Discovery requests (issue 13): evaluate blinded points, look up tags, download
//! the published filter, set whether this account can be found.

use std::future::Future;

use bytes::Bytes;
use tern_proto::discovery::{BlindedBatch, DiscoveredAccount, FilterPart, Tag};
use tern_proto::{Reply, Request};

use super::{unexpected, RelayConnection};
use crate::error::{Error, Result};

impl RelayConnection {
    /// Has the relay evaluate a batch of blinded points (a power of two of them, at
    /// most 4096; authenticated, verified accounts). The request leaves when this is
    /// called, so batches pipeline. Resolves to the evaluated points, 32 bytes each.
    pub fn discovery_evaluate(
        &self,
        blinded: Bytes,
    ) -> impl Future<Output = Result<Bytes>> + Send + 'static {
        let request = BlindedBatch::new(blinded)
            .map(|blinded| self.issue(Request::DiscoveryEvaluate { blinded }))
            .map_err(|e| Error::Protocol(e.to_string()));
        async move {
            match request?.await? {
                Reply::DiscoveryEvaluated(points) => Ok(points),
                _ => Err(unexpected("discovery_evaluate")),
            }
        }
    }

    /// The accounts of those of `tags` (1 to 256) that exist and are discoverable.
    /// Like [`RelayConnection::discovery_evaluate`], the request leaves at once.
    pub fn discovery_lookup(
        &self,
        tags: Vec<Tag>,
    ) -> impl Future<Output = Result<Vec<DiscoveredAccount>>> + Send + 'static {
        let reply = self.issue(Request::DiscoveryLookup { tags });
        async move {
            match reply.await? {
                Reply::DiscoveryFound(found) => Ok(found),
                _ => Err(unexpected("discovery_lookup")),
            }
        }
    }

    /// One part of the published filter: the latest snapshot if `since_day` is 0 (or
    /// too old), else the deltas since that day; `day` pins the artefact across its
    /// parts (0 for the latest). Works on any connection.
    pub fn discovery_filter(
        &self,
        since_day: u32,
        day: u32,
        part: u32,
    ) -> impl Future<Output = Result<FilterPart>> + Send + 'static {
        let reply = self.issue(Request::DiscoveryFilter {
            since_day,
            day,
            part,
        });
        async move {
            match reply.await? {
                Reply::DiscoveryFilterPart(p) => Ok(p),
                _ => Err(unexpected("discovery_filter")),
            }
        }
    }

    /// Sets whether this account's verified number can be found.
    pub async fn set_discoverable(&self, discoverable: bool) -> Result<()> {
        match self.request(Request::SetDiscoverable(discoverable)).await? {
            Reply::SetDiscoverable => Ok(()),
            _ => Err(unexpected("set_discoverable")),
        }
    }
}
