//! Contact discovery requests on a connection. Evaluations, lookups and the
//! discoverable setting need an authenticated device; a filter part is anonymous
//! (it counts as an anonymous request, like a blob download) and is charged to the
//! peer's address prefix (see [`crate::discovery::Discovery::filter_part`]).

use tern_proto::discovery::{BlindedBatch, Tag};
use tern_proto::Reply;

use super::Session;

impl Session {
    pub(super) async fn discovery_evaluate(&mut self, id: u64, blinded: BlindedBatch) {
        let d = self.settings.discovery.clone();
        let result = match self.authenticated() {
            Ok(by) => {
                d.evaluate(&by.address().account, self.prefix, &blinded)
                    .await
            }
            Err(e) => Err(e),
        };
        if result.is_ok() {
            crate::metrics::discovery_evaluations(blinded.len());
        }
        self.reply(id, result.map(Reply::DiscoveryEvaluated)).await
    }

    pub(super) async fn discovery_lookup(&mut self, id: u64, tags: Vec<Tag>) {
        let result = self
            .authenticated()
            .and_then(|by| self.settings.discovery.lookup(&by.address().account, &tags));
        self.reply(id, result.map(Reply::DiscoveryFound)).await
    }

    pub(super) async fn set_discoverable(&mut self, id: u64, on: bool) {
        let d = self.settings.discovery.clone();
        let result = match self.authenticated() {
            Ok(by) => d.set_discoverable(&by.address().account, on).await,
            Err(e) => Err(e),
        };
        self.reply(id, result.map(|()| Reply::SetDiscoverable))
            .await
    }

    pub(super) async fn discovery_filter(&mut self, id: u64, since_day: u32, day: u32, part: u32) {
        if !self.take_place(id).await {
            return;
        }
        let reply = (self.settings.discovery)
            .filter_part(self.prefix, since_day, day, part)
            .map(Reply::DiscoveryFilterPart);
        self.anonymous_reply(id, reply).await
    }
}
