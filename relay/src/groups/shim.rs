//! Until R's `mailboxes::multi::append_multi` lands: the same signature over the
//! existing per-device append (the body copied into each mailbox, parts ignored).
//! Deleted at that merge.

use tern_proto::{DeviceAddress, ErrorCode, MultiSend, MultiSendResult, Refused};

use crate::core::rate::AddressPrefix;
use crate::error::Result;
use crate::mailboxes::Appended;
use crate::server::Services;
use crate::store::Envelope;

/// A multi-recipient send appended, its commit not yet awaited.
pub(crate) struct MultiAppended {
    appended: Vec<Appended>,
    result: MultiSendResult,
}

impl MultiAppended {
    /// Waits for the group commit; what was stored and refused.
    pub(crate) async fn commit(self) -> Result<MultiSendResult> {
        for a in self.appended {
            a.commit().await?;
        }
        Ok(self.result)
    }
}

/// Checks each recipient as a sealed send does and appends to every accepted device.
pub(crate) fn append_multi(
    services: &Services,
    send: &MultiSend,
    from: AddressPrefix,
    _reserve: bool,
) -> Result<MultiAppended> {
    let mut appended = Vec::new();
    let mut result = MultiSendResult::default();
    let envelope = [Envelope {
        message_id: send.message_id,
        payload: send.body.clone(),
    }];
    for (i, r) in send.recipients.iter().enumerate() {
        let recipient = u32::try_from(i).unwrap_or(u32::MAX);
        for &device in &r.devices {
            let to = DeviceAddress {
                account: r.account,
                device,
            };
            let accounts = services.accounts();
            let checked = accounts
                .listed_sealed_recipient(to, &r.delivery_token, from, r.device_list_version)
                .and_then(|to| services.mailboxes().append(&to, &envelope));
            match checked {
                Ok(a) => {
                    result.accepted += 1;
                    appended.push(a);
                }
                Err(e) => {
                    let code = e.code();
                    let whole =
                        matches!(code, ErrorCode::Unauthorized | ErrorCode::StaleDeviceList);
                    if !whole
                        && !matches!(code, ErrorCode::UnknownRecipient | ErrorCode::MailboxFull)
                    {
                        return Err(e);
                    }
                    result.refused.push(Refused {
                        recipient,
                        device: (!whole).then_some(device),
                        code,
                    });
                    if whole {
                        break;
                    }
                }
            }
        }
    }
    Ok(MultiAppended { appended, result })
}
