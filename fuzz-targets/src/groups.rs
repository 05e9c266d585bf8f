//! An incoming group envelope, processed by a member of a fixed two-device group.
//!
//! mls-rs draws its own randomness, so the group's keys differ per process and a
//! stored envelope never decrypts in a later run. The first byte therefore picks the
//! layer to reach: even, the rest is an MLS message that the body wraps under the
//! group's current envelope key (so MLS parsing and processing see it); odd, the
//! rest is a raw envelope (the tag and AEAD layer). Rules: nothing panics; a refused
//! input leaves the member's session as it was (a message from the other member,
//! made before, still decrypts after the error); an accepted input comes from the
//! other member.

use std::sync::{Arc, LazyLock};

use ed25519_dalek::{Signer, SigningKey};
use tern_client::groups::{Changes, DeviceCredential, GroupDevice, GroupMeta, Processed};
use tern_client::store::{KvStore, MemoryKv};
use tern_proto::{auth, AccountId, DeviceId};

const NOW: u64 = 1_800_000_000_000;
const GOOD: &[u8] = b"the one message alice sent";
const ALICE: AccountId = AccountId([1; 16]);

struct Fixture {
    bob: GroupDevice,
    group_id: Vec<u8>,
    /// Alice's message, not processed by Bob in the stored state.
    good: Vec<u8>,
}

fn device(seed: u8, account: AccountId, kv: &Arc<MemoryKv>) -> GroupDevice {
    let identity = SigningKey::from_bytes(&[seed; 32]);
    let key = SigningKey::from_bytes(&[seed.wrapping_add(1); 32]);
    let public = key.verifying_key().to_bytes();
    let cred = DeviceCredential {
        account,
        device: DeviceId::PRIMARY,
        identity_key: identity.verifying_key().to_bytes(),
        certificate: identity
            .sign(&auth::device_certificate(Some(&account), &public))
            .to_bytes(),
    };
    GroupDevice::new(kv.clone() as Arc<dyn KvStore>, &key.to_bytes(), cred).expect("device")
}

fn build() -> Fixture {
    let (akv, bkv) = (Arc::new(MemoryKv::new()), Arc::new(MemoryKv::new()));
    let alice = device(1, ALICE, &akv);
    let bob = device(3, AccountId([3; 16]), &bkv);
    let kps = bob.key_packages(1, NOW).expect("kp");
    bkv.apply(kps.ops, true).expect("apply");
    let meta = GroupMeta {
        handle: [7; 16],
        name: "fuzz".into(),
        ..GroupMeta::default()
    };
    let created = alice.create([9; 32], &meta, NOW).expect("create");
    akv.apply(created.ops, true).expect("apply");
    let mut g = created.value;
    let add = Changes {
        add: kps.value,
        ..Changes::default()
    };
    let plan = g.commit(&add, NOW).expect("commit");
    akv.apply(plan.ops, true).expect("apply");
    let applied = g.apply_pending().expect("apply pending");
    akv.apply(applied.ops, true).expect("apply");
    let welcome = plan.value.welcome.expect("welcome");
    let joined = bob
        .join(&welcome.welcome, &welcome.ratchet_tree, NOW)
        .expect("join");
    bkv.apply(joined.ops, true).expect("apply");
    let good = g.encrypt(GOOD).expect("encrypt").value;
    Fixture {
        bob,
        group_id: g.group_id().to_vec(),
        good,
    }
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(build);

/// The body: see the module docs.
pub fn group_envelope(data: &[u8]) {
    let f = &*FIXTURE;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut g = f.bob.load(&f.group_id).expect("load").expect("stored");
    let envelope = if mode % 2 == 0 {
        g.wrap_key().expect("key").wrap(rest).expect("wrap")
    } else {
        rest.to_vec()
    };
    let _ = f.bob.route(&envelope);
    match g.process(&envelope, NOW) {
        Ok(staged) => match staged.value {
            Processed::Message { sender, .. } => assert_eq!(sender.account, ALICE),
            Processed::Commit(c) => assert_eq!(c.committer.account, ALICE),
        },
        Err(_) => {
            let after = g
                .process(&f.good, NOW)
                .expect("a refused input changed the session");
            match after.value {
                Processed::Message { content, .. } => assert_eq!(content, GOOD),
                Processed::Commit(_) => panic!("the fixture's message is a message"),
            }
        }
    }
}
