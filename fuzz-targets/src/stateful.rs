//! Two clients' sessions through a relay mailbox, driven by the fuzz input.
//!
//! Alice starts a session with Bob from his bundle; each then sends end-to-end
//! messages (`tern.e2e.v1.Content`, as `crypto::message` builds them) that the relay's
//! mailbox store queues. The input is a list of operations that send, deliver and
//! acknowledge, drop, duplicate, reorder, corrupt, and restart a client (its session
//! set through its stored bytes).

use std::collections::HashSet;

use rand::rngs::StdRng;
use tern_client::crypto::message::{self, PreKeyId};
use tern_client::crypto::sessions::SessionSet;
use tern_proto::{e2e, AccountId, DeviceAddress, DeviceId, Envelope, MessageId};
use tern_relay::store::{MailboxStore, MemoryStore, StoredMessage};

use crate::fixture::{rng, Party, FIXTURE};

/// Operations per input, so one input stays fast.
const MAX_OPS: usize = 256;

struct Client {
    party: &'static Party,
    address: DeviceAddress,
    sessions: SessionSet,
    /// Bodies sent, each unique.
    sent: u32,
    /// Bodies accepted from the other side.
    accepted: HashSet<Vec<u8>>,
}

impl Client {
    fn new(party: &'static Party, account: u8) -> Self {
        Client {
            party,
            address: DeviceAddress {
                account: AccountId([account; 16]),
                device: DeviceId::PRIMARY,
            },
            sessions: SessionSet::default(),
            sent: 0,
            accepted: HashSet::new(),
        }
    }
}

/// The relay's mailboxes and the two clients.
struct World {
    /// One generator for the whole run: a generator seeded afresh for each call would
    /// give every ratchet step the same key.
    rng: StdRng,
    store: MemoryStore,
    clients: [Client; 2],
    /// Every body each side sent, to check that what is accepted was sent.
    sent: [HashSet<Vec<u8>>; 2],
}

/// Drives the world from `data`: one operation per byte (low 3 bits), bits 3-6 its
/// argument, bit 7 the side. Rules: an accepted body was sent by the other side and
/// is accepted once; an intact message not yet accepted always opens, whatever was
/// dropped, duplicated, reordered or restarted before it.
pub fn two_clients(data: &[u8]) {
    let f = &*FIXTURE;
    let mut world = World {
        rng: rng(),
        store: MemoryStore::new(),
        clients: [Client::new(&f.alice, 1), Client::new(&f.bob, 11)],
        sent: [HashSet::new(), HashSet::new()],
    };
    let verified = f.bob.bundle().verify().expect("a bundle of fixed keys");
    let alice = &mut world.clients[0];
    alice
        .sessions
        .initiate(&mut world.rng, &f.alice.id(), &f.alice.dh, &verified)
        .expect("initiate");
    for &op in data.iter().take(MAX_OPS) {
        let side = usize::from(op >> 7);
        let arg = usize::from((op >> 3) & 0x0f);
        match op & 0x07 {
            0 | 1 => world.send(side),
            2 => world.deliver(side, 0, None, true),
            3 => world.drop_head(side),
            4 => world.deliver(side, 0, None, false),
            5 => world.deliver(side, arg, None, true),
            6 => world.deliver(side, 0, Some(arg * 7 + usize::from(op & 1)), true),
            _ => world.restart(side),
        }
    }
}

impl World {
    fn send(&mut self, from: usize) {
        let to = self.clients[1 - from].address;
        let client = &mut self.clients[from];
        let body = format!("{}:{}", from, client.sent).into_bytes();
        let plaintext = e2e::Plaintext {
            body: body.clone().into(),
            ..Default::default()
        };
        let padded = message::pad_plaintext(&plaintext).expect("a small plaintext pads");
        // A responder cannot send before it has read a message: nothing is sent.
        let Ok(content) = message::encrypt(&mut client.sessions, &client.party.vouch(), &padded)
        else {
            return;
        };
        client.sent += 1;
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&client.sent.to_be_bytes());
        id[4] = from as u8;
        let envelope = Envelope {
            message_id: MessageId(id),
            payload: content.into(),
        };
        self.store
            .append(&to, &[envelope], 0, u64::MAX)
            .expect("a memory mailbox accepts");
        self.sent[from].insert(body);
    }

    fn queued(&self, of: usize) -> Vec<StoredMessage> {
        self.store
            .read(&self.clients[of].address, 0, usize::MAX)
            .expect("a memory mailbox reads")
    }

    fn drop_head(&mut self, of: usize) {
        if let Some(m) = self.queued(of).first() {
            self.lose(of, m);
        }
    }

    /// Takes a queued message out: it is never delivered again.
    fn lose(&mut self, of: usize, m: &StoredMessage) {
        self.store
            .remove(&self.clients[of].address, &[m.seq])
            .expect("remove");
    }

    /// Delivers the `index`th queued message (wrapping) to `of`, with one byte
    /// flipped at `corrupt` if given, and acknowledges it if `ack`.
    fn deliver(&mut self, of: usize, index: usize, corrupt: Option<usize>, ack: bool) {
        let queued = self.queued(of);
        if queued.is_empty() {
            return;
        }
        let m = &queued[index % queued.len()];
        let mut payload = m.payload.to_vec();
        if let Some(at) = corrupt {
            if !payload.is_empty() {
                let at = at % payload.len();
                payload[at] ^= 0x5a;
            }
        }
        let from = 1 - of;
        let sender = self.clients[from].party;
        let client = &mut self.clients[of];
        let (id, dh, spk) = (client.party.id(), &client.party.dh, &client.party.spk);
        let mut prekeys = |p: PreKeyId| (p == PreKeyId::Signed(1)).then(|| spk.clone());
        let opened = message::decrypt(
            &mut self.rng,
            &mut client.sessions,
            (&id, dh),
            &sender.id(),
            &mut prekeys,
            &payload,
        );
        match opened {
            Ok(opened) => {
                let body = opened.plaintext.body.to_vec();
                assert!(
                    self.sent[from].contains(&body),
                    "accepted a body never sent"
                );
                assert!(client.accepted.insert(body), "accepted a body twice");
            }
            Err(e) => {
                let body = body_of(from, m);
                let fresh = !client.accepted.contains(&body);
                assert!(
                    corrupt.is_some() || !fresh,
                    "an intact new message failed: {e:?}"
                );
            }
        }
        // A corrupted delivery is acknowledged too: it is gone either way.
        if ack || corrupt.is_some() {
            let m = m.clone();
            self.lose(of, &m);
        }
    }

    fn restart(&mut self, side: usize) {
        let client = &mut self.clients[side];
        let bytes = client.sessions.to_bytes();
        client.sessions = SessionSet::from_bytes(&bytes).expect("a stored set parses");
    }
}

/// The body the message id names (the model's bookkeeping: the id carries the
/// sender's count, so a message that fails is known without opening it).
fn body_of(from: usize, m: &StoredMessage) -> Vec<u8> {
    let n = u32::from_be_bytes([
        m.message_id.0[0],
        m.message_id.0[1],
        m.message_id.0[2],
        m.message_id.0[3],
    ]);
    format!("{}:{}", from, n.saturating_sub(1)).into_bytes()
}

/// Encodes operations for a seed: `(op, side, arg)`.
pub fn encode_ops(ops: &[(u8, u8, u8)]) -> Vec<u8> {
    ops.iter()
        .map(|&(op, side, arg)| (op & 0x07) | ((arg & 0x0f) << 3) | ((side & 1) << 7))
        .collect()
}
