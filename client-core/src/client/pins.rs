//! The relay's certificate pins across a rotation ([`Pins`]), kept in the device
//! store: the current pin is the fingerprint in the relay address
//! (`LocalRecord::relay`), an announced next one a `RelayPinRecord` beside it.
//!
//! An announcement is only taken from a connection the worker verified under a pin
//! it already holds, so only someone holding the relay's current key can move a
//! client to another certificate. Once a connection is verified under the next pin,
//! that pin becomes the address's and the old one is dropped, in one write.

use tern_proto::{Fingerprint, NextCertificate, RelayAddress};

use super::state::State;
use crate::net::tls::Pins;
use crate::store::records::{RelayPinRecord, RELAY_PIN_KEY};
use crate::store::{Batch, Namespace};
use crate::{Error, Result};

impl State {
    /// The pins of `relay` (the stored address): its fingerprint and the stored
    /// next one, if any.
    pub(crate) fn relay_pins(&self, relay: &RelayAddress) -> Result<Pins> {
        let next = match self.kv.get(Namespace::Local, RELAY_PIN_KEY)? {
            None => None,
            Some(bytes) => {
                let record: RelayPinRecord = prost::Message::decode(&bytes[..])
                    .map_err(|_| Error::Store(crate::store::StoreError::Corrupt))?;
                let fingerprint = <[u8; 32]>::try_from(&record.next_fingerprint[..])
                    .map_err(|_| Error::Store(crate::store::StoreError::Corrupt))?;
                Some(NextCertificate {
                    fingerprint: Fingerprint(fingerprint),
                    switch_at_ms: record.switch_at_ms,
                })
            }
        };
        Ok(Pins::new(relay.fingerprint, next))
    }

    /// Stores an announced next pin (durably: it is what lets this device reach the
    /// relay after the switch).
    pub(crate) fn store_next_pin(&mut self, next: &NextCertificate) -> Result<()> {
        let mut batch = Batch::new();
        batch.put(
            Namespace::Local,
            RELAY_PIN_KEY.to_vec(),
            &RelayPinRecord {
                next_fingerprint: next.fingerprint.0.to_vec(),
                switch_at_ms: next.switch_at_ms,
            },
        );
        self.commit(batch, true)
    }

    /// Makes `current` the address's pin and drops the next one, in one write.
    pub(crate) fn promote_pin(&mut self, current: Fingerprint) -> Result<RelayAddress> {
        let mut relay: RelayAddress = self.relay().parse()?;
        relay.fingerprint = current;
        let mut local = self.local.clone();
        local.relay = relay.to_string();
        let mut batch = Batch::new();
        batch.put_local(&local);
        batch.delete(Namespace::Local, RELAY_PIN_KEY.to_vec());
        self.commit(batch, true)?;
        self.local = local;
        Ok(relay)
    }
}

impl super::Client {
    /// The relay certificate this client pins, and the next one the relay
    /// announced (during a rotation; `None` otherwise). A client that was offline
    /// for the whole overlap fails to connect with
    /// [`Error::FingerprintMismatch`] after the
    /// switch: the app re-pins it by a relay address obtained out of band.
    pub fn relay_certificate(&self) -> (Fingerprint, Option<NextCertificate>) {
        (self.shared.pins.current(), self.shared.pins.next())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::rngs::OsRng;
    use tern_proto::{AccountId, DeviceAddress, DeviceId};

    use super::*;
    use crate::crypto::x3dh::AgreementKeyPair;
    use crate::net::tls::Presented;
    use crate::store::MemoryKv;

    fn stored_state(kv: Arc<MemoryKv>) -> State {
        let relay = RelayAddress::new(Fingerprint([1; 32]), "127.0.0.1", 7443);
        let new = super::super::state::NewDevice {
            relay: relay.to_string(),
            identity_secret: &[2; 32],
            linked: None,
            device_secret: &[3; 32],
            identity_dh: &AgreementKeyPair::generate(&mut OsRng),
            address: DeviceAddress {
                account: AccountId([4; 16]),
                device: DeviceId::PRIMARY,
            },
            relay_signing_key: [5; 32],
        };
        State::create(kv, new, 1_800_000_000_000, &mut OsRng).expect("create")
    }

    #[test]
    fn an_announced_pin_survives_a_restart_and_replaces_the_old_once_connected_under() {
        let kv: Arc<MemoryKv> = Arc::new(MemoryKv::default());
        let mut state = stored_state(kv.clone());
        let relay: RelayAddress = state.relay().parse().expect("address");
        let pins = state.relay_pins(&relay).expect("pins");
        assert_eq!((pins.current(), pins.next()), (relay.fingerprint, None));
        let next = NextCertificate {
            fingerprint: Fingerprint([0xab; 32]),
            switch_at_ms: 42,
        };
        assert!(pins.announce(next));
        state.store_next_pin(&next).expect("store");
        // A restart: read back from the store.
        let mut reopened = State::load(kv.clone(), 0).expect("load").expect("device");
        let pins = reopened.relay_pins(&relay).expect("pins");
        assert_eq!(pins.next(), Some(next));
        assert_eq!(pins.connected_under(next.fingerprint), Presented::Next);
        let promoted = reopened.promote_pin(next.fingerprint).expect("promote");
        assert_eq!(promoted.fingerprint, next.fingerprint);
        assert_eq!(promoted.hosts(), relay.hosts());
        let again = State::load(kv, 0).expect("load").expect("device");
        let stored: RelayAddress = again.relay().parse().expect("address");
        assert_eq!(stored, promoted);
        let pins = again.relay_pins(&stored).expect("pins");
        assert_eq!((pins.current(), pins.next()), (next.fingerprint, None));
    }
}
