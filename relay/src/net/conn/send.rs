//! Sends on a connection: authenticated and sealed, appended in the order they
//! arrive, each answered once its group commit is done.

use std::future::Future;

use bytes::Bytes;
use tern_proto::{DeviceAddress, MultiSend, Reply};

use super::{answer_later, response, Session};
use crate::error::{Error, Result};
use crate::mailboxes::{append_multi, Appended, MultiAppended};
use crate::metrics::SendKind;
use crate::{server::Services, store::Envelope};

impl Session {
    /// A send from this connection's device; `list_version` is the recipient's
    /// device list version the sender holds (0: unchecked).
    pub(super) async fn send(
        &mut self,
        id: u64,
        to: DeviceAddress,
        envelopes: Vec<Envelope>,
        list_version: u64,
    ) {
        let Some(sender) = self.device.get().cloned() else {
            return self.reply(id, Err(Error::Unauthorized)).await;
        };
        self.ordered_send(id, SendKind::Direct, |services| {
            let to = services
                .accounts()
                .listed_recipient(&sender, to, list_version)?;
            services.mailboxes().append(&to, &envelopes)
        })
        .await;
    }

    /// A send from an unidentified sender: needs no authentication, only the
    /// recipient's delivery token.
    pub(super) async fn sealed_send(
        &mut self,
        id: u64,
        to: DeviceAddress,
        token: Bytes,
        envelopes: Vec<Envelope>,
        list_version: u64,
    ) -> bool {
        let from = self.prefix;
        self.ordered_send(id, SendKind::Sealed, |services| {
            let accounts = services.accounts();
            let to = accounts.listed_sealed_recipient(to, &token, from, list_version)?;
            services.mailboxes().append(&to, &envelopes)
        })
        .await
    }

    /// A multi-recipient send (anonymous, like a sealed send): the body stored once,
    /// an entry per accepted device, answered with what was refused once its
    /// commit is done. In arrival order with the connection's other sends; counts
    /// as an anonymous request only if some device accepted it.
    pub(super) async fn multi_send(&mut self, id: u64, send: MultiSend) {
        if !self.take_place(id).await {
            return;
        }
        let from = self.prefix;
        let sent = self.ordered_send(id, SendKind::Multi, |services| {
            append_multi(services, &send, from, false)
        });
        if sent.await {
            self.anonymous_request();
        }
    }

    /// Appends a send here, in the order requests arrive (so pipelined sends to one
    /// device are stored in the order sent); its answer waits for the group commit in
    /// the writer, under the per-connection cap: past the cap the reader waits here,
    /// which is backpressure instead of a growing queue. True if the append stored
    /// something (its commit may still fail). Counted as a send of `kind` once its
    /// commit is done, so the metrics never count a send that was not acknowledged.
    async fn ordered_send<A: Pending>(
        &mut self,
        id: u64,
        kind: SendKind,
        append: impl FnOnce(&Services) -> Result<A>,
    ) -> bool {
        let Ok(permit) = self.requests.clone().acquire_owned().await else {
            return false;
        };
        let appended = append(&self.services);
        let stored = appended.as_ref().is_ok_and(Pending::stored);
        let answer = async move {
            let result = match appended {
                Ok(appended) => appended.answer().await.map(|(reply, envelopes)| {
                    if envelopes > 0 {
                        crate::metrics::sent(kind, envelopes);
                    }
                    reply
                }),
                Err(e) => Err(e),
            };
            drop(permit);
            response(id, result)
        };
        answer_later(&self.out, Box::pin(answer)).await;
        stored
    }
}

/// A send appended, answered once durable.
trait Pending: Send + 'static {
    /// Whether it stored anything.
    fn stored(&self) -> bool;
    /// Waits until it is durable; the answer and the envelopes stored (for multi:
    /// devices, without those the store refused at commit).
    fn answer(self) -> impl Future<Output = Result<(Reply, usize)>> + Send;
}

impl Pending for Appended {
    fn stored(&self) -> bool {
        true
    }
    async fn answer(self) -> Result<(Reply, usize)> {
        let n = self.commit().await?;
        let accepted = u32::try_from(n).unwrap_or(u32::MAX);
        Ok((Reply::Send { accepted }, n))
    }
}

impl Pending for MultiAppended {
    fn stored(&self) -> bool {
        self.accepted() > 0
    }
    async fn answer(self) -> Result<(Reply, usize)> {
        let result = self.commit().await?;
        let n = result.accepted as usize;
        Ok((Reply::MultiSend(result), n))
    }
}
