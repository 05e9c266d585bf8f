use std::sync::Arc;

use ed25519_dalek::{Signer, SigningKey};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tern_proto::{auth, AccountId, DeviceId};

use super::*;
use crate::store::{KvStore, MemoryKv, Namespace};

const NOW: u64 = 1_800_000_000_000;

type Records = (Namespace, Vec<(Vec<u8>, Vec<u8>)>);
type Check = fn(&GroupError) -> bool;

struct Account {
    identity: SigningKey,
    id: AccountId,
}

impl Account {
    fn new() -> Self {
        let mut id = [0u8; 16];
        OsRng.fill_bytes(&mut id);
        Account {
            identity: SigningKey::generate(&mut OsRng),
            id: AccountId(id),
        }
    }

    fn credential(&self, device: u32, key: &SigningKey) -> DeviceCredential {
        let cert = self.identity.sign(&auth::device_certificate(
            Some(&self.id),
            &key.verifying_key().to_bytes(),
        ));
        DeviceCredential {
            account: self.id,
            device: DeviceId::new(device).expect("device id"),
            identity_key: self.identity.verifying_key().to_bytes(),
            certificate: cert.to_bytes(),
        }
    }

    fn device(&self, device: u32) -> Dev {
        let key = SigningKey::generate(&mut OsRng);
        let cred = self.credential(device, &key);
        Dev::open(Arc::new(MemoryKv::new()), key, cred)
    }

    /// A device whose own commits skip Tern's rules.
    fn misbehaving(&self, device: u32) -> Dev {
        let key = SigningKey::generate(&mut OsRng);
        let cred = self.credential(device, &key);
        let kv = Arc::new(MemoryKv::new());
        let mut dev = Dev::open(kv.clone(), key.clone(), cred.clone());
        dev.device = GroupDevice::misbehaving(kv as Arc<dyn KvStore>, &key.to_bytes(), cred);
        dev
    }
}

struct JoinInfo {
    added_by: Member,
    meta: GroupMeta,
    member_tokens: Option<Vec<u8>>,
}

/// One device: its store, its MLS client and (once in it) the group.
struct Dev {
    kv: Arc<MemoryKv>,
    key: SigningKey,
    cred: DeviceCredential,
    device: GroupDevice,
    group: Option<GroupSession>,
    /// Reload everything from the store after every step (a restart).
    restart: bool,
}

impl Dev {
    fn open(kv: Arc<MemoryKv>, key: SigningKey, cred: DeviceCredential) -> Self {
        let device = GroupDevice::new(
            kv.clone() as Arc<dyn KvStore>,
            &key.to_bytes(),
            cred.clone(),
        )
        .expect("device");
        Dev {
            kv,
            key,
            cred,
            device,
            group: None,
            restart: false,
        }
    }

    fn apply<T>(&mut self, staged: Staged<T>) -> T {
        self.kv.apply(staged.ops, true).expect("apply");
        staged.value
    }

    /// After a step: with `restart`, a fresh client and session from the store.
    fn step(&mut self) {
        if !self.restart {
            return;
        }
        let id = self.group.as_ref().map(|g| g.group_id().to_vec());
        self.device = GroupDevice::new(
            self.kv.clone() as Arc<dyn KvStore>,
            &self.key.to_bytes(),
            self.cred.clone(),
        )
        .expect("device");
        self.group = id.map(|id| self.device.load(&id).expect("load").expect("stored"));
    }

    fn key_package(&mut self) -> Vec<u8> {
        let s = self.device.key_packages(1, NOW).expect("key package");
        let mut kps = self.apply(s);
        self.step();
        kps.remove(0)
    }

    fn g(&mut self) -> &mut GroupSession {
        self.group.as_mut().expect("in a group")
    }

    fn create(&mut self, name: &str) {
        let mut handle = [0u8; 16];
        OsRng.fill_bytes(&mut handle);
        let meta = GroupMeta {
            handle,
            name: name.into(),
            ..GroupMeta::default()
        };
        let mut gid = [0u8; GROUP_ID_LEN];
        OsRng.fill_bytes(&mut gid);
        let s = self.device.create(gid, &meta, NOW).expect("create");
        let g = self.apply(s);
        self.group = Some(g);
        self.step();
    }

    fn commit(&mut self, changes: &Changes) -> PlannedCommit {
        let s = self.g().commit(changes, NOW).expect("commit");
        let plan = self.apply(s);
        self.step();
        plan
    }

    fn apply_pending(&mut self) -> CommitApplied {
        let s = self.g().apply_pending().expect("apply");
        let done = self.apply(s);
        self.step();
        done
    }

    fn join(&mut self, welcome: &Welcome) -> JoinInfo {
        let s = self
            .device
            .join(&welcome.welcome, &welcome.ratchet_tree, NOW)
            .expect("join");
        let joined = self.apply(s);
        self.group = Some(joined.session);
        self.step();
        JoinInfo {
            added_by: joined.added_by,
            meta: joined.meta,
            member_tokens: joined.member_tokens,
        }
    }

    fn send(&mut self, text: &[u8]) -> Vec<u8> {
        let s = self.g().encrypt(text).expect("encrypt");
        let envelope = self.apply(s);
        self.step();
        envelope
    }

    fn receive(&mut self, envelope: &[u8]) -> Processed {
        let s = self.g().process(envelope, NOW).expect("process");
        let p = self.apply(s);
        self.step();
        p
    }

    fn snapshot(&self) -> Vec<Records> {
        Namespace::ALL
            .iter()
            .map(|ns| (*ns, self.kv.scan(*ns).expect("scan")))
            .collect()
    }
}

fn adds(kps: Vec<Vec<u8>>) -> Changes {
    Changes {
        add: kps,
        ..Changes::default()
    }
}

fn message_from(p: Processed) -> (Member, Vec<u8>) {
    match p {
        Processed::Message { sender, content } => (sender, content),
        Processed::Commit(_) => panic!("expected a message"),
    }
}

#[test]
fn three_members_with_two_devices_each_converge_and_restart_changes_nothing() {
    let accounts: Vec<Account> = (0..3).map(|_| Account::new()).collect();
    let mut devs: Vec<Dev> = accounts
        .iter()
        .flat_map(|a| [a.device(1), a.device(2)])
        .collect();
    // Two devices restart after every step.
    devs[3].restart = true;
    devs[4].restart = true;
    devs[0].create("friends");
    let kps: Vec<Vec<u8>> = devs[1..].iter_mut().map(|d| d.key_package()).collect();
    let plan = devs[0].commit(&adds(kps));
    assert_eq!(plan.epoch, 0);
    assert_eq!(plan.added.len(), 5);
    let welcome = plan.welcome.clone().expect("welcome");
    let done = devs[0].apply_pending();
    assert_eq!(done.epoch, 1);
    assert_eq!(done.added.len(), 5);
    assert_eq!(
        Sha256::digest(devs[0].g().epoch_token().expect("token")).as_slice(),
        plan.next_token_hash
    );
    for d in devs[1..].iter_mut() {
        let joined = d.join(&welcome);
        assert_eq!(joined.added_by.account, accounts[0].id);
        assert_eq!(joined.meta.name, "friends");
        assert_eq!(d.g().members().len(), 6);
    }
    let token = devs[0].g().epoch_token().expect("token");
    for d in devs.iter_mut() {
        assert_eq!(d.g().epoch(), 1);
        assert_eq!(d.g().epoch_token().expect("token"), token);
    }
    // Every device sends; every other device reads each message once, in order.
    for round in 0..2 {
        for from in 0..devs.len() {
            let text = format!("m{round} from {from}").into_bytes();
            let envelope = devs[from].send(&text);
            assert_eq!(envelope[0], wrap::ENVELOPE_KIND);
            for to in 0..devs.len() {
                if to == from {
                    continue;
                }
                let (group_id, epoch) = devs[to]
                    .device
                    .route(&envelope)
                    .expect("route")
                    .expect("known tag");
                assert_eq!(group_id, devs[to].g().group_id());
                assert_eq!(epoch, 1);
                let (sender, content) = message_from(devs[to].receive(&envelope));
                assert_eq!(content, text);
                assert_eq!(sender.account, devs[from].cred.account);
                assert_eq!(sender.device, devs[from].cred.device);
                assert_eq!(sender.identity_key, devs[from].cred.identity_key);
            }
        }
    }
}

fn group_of(devs: &mut [Dev]) {
    devs[0].create("g");
    let kps: Vec<Vec<u8>> = devs[1..].iter_mut().map(|d| d.key_package()).collect();
    let plan = devs[0].commit(&adds(kps));
    devs[0].apply_pending();
    let welcome = plan.welcome.expect("welcome");
    for d in devs[1..].iter_mut() {
        d.join(&welcome);
    }
}

#[test]
fn a_late_joiner_cannot_read_an_earlier_message() {
    let (a, b, c) = (Account::new(), Account::new(), Account::new());
    let mut devs = vec![a.device(1), b.device(1)];
    group_of(&mut devs);
    let early = devs[0].send(b"before carol");
    message_from(devs[1].receive(&early));
    let mut carol = c.device(1);
    let plan = devs[0].commit(&adds(vec![carol.key_package()]));
    devs[0].apply_pending();
    devs[1].receive(&plan.commit);
    let body = plan.welcome.expect("welcome").body();
    assert_eq!(body[0], WELCOME_KIND);
    let s = carol.device.join_body(&body, NOW).expect("join");
    carol.group = Some(carol.apply(s).session);
    assert!(matches!(
        carol.device.join_body(&body[..body.len() - 3], NOW),
        Err(GroupError::Malformed | GroupError::Rejected(_))
    ));
    assert_eq!(carol.device.route(&early).expect("route"), None);
    assert!(matches!(
        carol.g().process(&early, NOW),
        Err(GroupError::UnknownTag)
    ));
    // Later messages she reads.
    let later = devs[1].send(b"hi carol");
    assert_eq!(message_from(carol.receive(&later)).1, b"hi carol");
}

#[test]
fn a_removed_member_cannot_read_a_later_message() {
    let (a, b, c) = (Account::new(), Account::new(), Account::new());
    let mut devs = vec![a.device(1), b.device(1), c.device(1), c.device(2)];
    group_of(&mut devs);
    let plan = devs[0].commit(&Changes {
        remove_accounts: vec![c.id],
        ..Changes::default()
    });
    assert_eq!(plan.removed.len(), 2);
    devs[0].apply_pending();
    match devs[1].receive(&plan.commit) {
        Processed::Commit(c) => {
            assert_eq!(c.removed.len(), 2);
            assert!(!c.removed_self);
        }
        Processed::Message { .. } => panic!("expected a commit"),
    }
    // Carol's first device processes its removal: the group is deleted.
    let kv_before = devs[2].kv.scan(Namespace::MlsTag).expect("scan").len();
    assert!(kv_before > 0);
    match devs[2].receive(&plan.commit) {
        Processed::Commit(c) => assert!(c.removed_self),
        Processed::Message { .. } => panic!("expected a commit"),
    }
    assert!(devs[2].kv.scan(Namespace::MlsTag).expect("scan").is_empty());
    assert!(devs[2]
        .kv
        .scan(Namespace::MlsState)
        .expect("scan")
        .is_empty());
    let later = devs[0].send(b"without carol");
    assert_eq!(devs[2].device.route(&later).expect("route"), None);
    // Her second device never saw the removal: its kept state still cannot read.
    assert!(matches!(
        devs[3].g().process(&later, NOW),
        Err(GroupError::UnknownTag)
    ));
    assert_eq!(message_from(devs[1].receive(&later)).1, b"without carol");
}

#[test]
fn the_loser_of_two_concurrent_commits_clears_processes_the_winner_and_replans() {
    let (a, b, c) = (Account::new(), Account::new(), Account::new());
    let mut devs = vec![a.device(1), b.device(1)];
    group_of(&mut devs);
    let mut carol = c.device(1);
    let carol_kp = carol.key_package();
    let relay_hash = Sha256::digest(devs[0].g().epoch_token().expect("token"));
    // Both commit in epoch 1.
    let winner = devs[0].commit(&Changes::default());
    let loser = devs[1].commit(&adds(vec![carol_kp.clone()]));
    assert_eq!((winner.epoch, loser.epoch), (1, 1));
    assert_eq!(Sha256::digest(winner.epoch_token), relay_hash);
    // A message cannot be sent while a commit is pending.
    assert!(matches!(
        devs[1].g().encrypt(b"x"),
        Err(GroupError::PendingCommit)
    ));
    // The relay takes the winner; the loser clears, processes it, re-plans.
    devs[0].apply_pending();
    let s = devs[1].g().clear_pending().expect("clear");
    devs[1].apply(s);
    assert!(!devs[1].g().has_pending());
    devs[1].receive(&winner.commit);
    assert_eq!(devs[1].g().epoch(), 2);
    let again = devs[1].commit(&adds(vec![carol_kp]));
    assert_eq!(again.epoch, 2);
    // The relay's check: its stored hash is the winner's next_token_hash.
    assert_eq!(
        Sha256::digest(again.epoch_token).as_slice(),
        winner.next_token_hash
    );
    devs[1].apply_pending();
    devs[0].receive(&again.commit);
    carol.join(&again.welcome.expect("welcome"));
    let m = carol.send(b"joined");
    for d in devs.iter_mut() {
        assert_eq!(d.g().epoch(), 3);
        assert_eq!(message_from(d.receive(&m)).1, b"joined");
    }
    // Re-planning an add of a present device leaves it out.
    let kp = carol.key_package();
    let plan = devs[0].commit(&adds(vec![kp]));
    assert!(plan.added.is_empty());
    assert!(plan.welcome.is_none());
}

#[test]
fn a_message_of_a_prior_epoch_still_decrypts() {
    let (a, b) = (Account::new(), Account::new());
    let mut devs = vec![a.device(1), b.device(1)];
    group_of(&mut devs);
    let late = devs[1].send(b"sent before the commit");
    let plan = devs[0].commit(&Changes::default());
    devs[0].apply_pending();
    assert_eq!(
        message_from(devs[0].receive(&late)).1,
        b"sent before the commit"
    );
    devs[1].receive(&plan.commit);
}

#[test]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    let (a, b) = (Account::new(), Account::new());
    let mut devs = vec![a.device(1), b.device(1)];
    group_of(&mut devs);
    let good = devs[0].send(b"good");
    let before = devs[1].snapshot();
    let epoch_key = devs[1].g().wrap_key().expect("key");
    let bad: Vec<(Vec<u8>, Check)> = vec![
        (Vec::new(), |e| matches!(e, GroupError::Malformed)),
        (vec![0x02; 10], |e| matches!(e, GroupError::Malformed)),
        (good[..good.len() / 2].to_vec(), |e| {
            matches!(e, GroupError::BadEnvelope)
        }),
        (good[..1 + 16 + 5].to_vec(), |e| {
            matches!(e, GroupError::Malformed)
        }),
        (
            {
                let mut x = good.clone();
                x[5] ^= 1;
                x
            },
            |e| matches!(e, GroupError::UnknownTag),
        ),
        (
            {
                let mut x = good.clone();
                let last = x.len() - 1;
                x[last] ^= 1;
                x
            },
            |e| matches!(e, GroupError::BadEnvelope),
        ),
        (epoch_key.wrap(b"not an MLS message").expect("wrap"), |e| {
            matches!(e, GroupError::Malformed)
        }),
        (
            {
                // A real MLS message, truncated, under a valid envelope.
                let inner = epoch_key.unwrap(&good).expect("unwrap");
                epoch_key.wrap(&inner[..inner.len() - 40]).expect("wrap")
            },
            |e| matches!(e, GroupError::Malformed | GroupError::Rejected(_)),
        ),
    ];
    for (input, expected) in bad {
        let e = devs[1].g().process(&input, NOW).expect_err("refused");
        assert!(expected(&e), "unexpected {e:?}");
        assert!(devs[1].snapshot() == before, "state changed after {e:?}");
    }
    // Replaying a message already read is refused too, state unchanged.
    assert_eq!(message_from(devs[1].receive(&good)).1, b"good");
    let after = devs[1].snapshot();
    assert!(devs[1].g().process(&good, NOW).is_err());
    assert!(devs[1].snapshot() == after);
    let next = devs[0].send(b"still fine");
    assert_eq!(message_from(devs[1].receive(&next)).1, b"still fine");
}

#[test]
fn a_credential_whose_certificate_does_not_cover_the_leaf_key_is_refused() {
    let (a, b, mallory) = (Account::new(), Account::new(), Account::new());
    // A device key certified by another identity than the one it names.
    let key = SigningKey::generate(&mut OsRng);
    let mut forged = b.credential(1, &key);
    forged.certificate = mallory
        .identity
        .sign(&auth::device_certificate(
            Some(&b.id),
            &key.verifying_key().to_bytes(),
        ))
        .to_bytes();
    assert_eq!(
        forged.verify(&key.verifying_key().to_bytes()),
        Err(CredentialError::BadCertificate)
    );
    // Bob's valid credential on another device's key.
    let other = SigningKey::generate(&mut OsRng);
    let lifted = b.credential(2, &key);
    assert_eq!(
        lifted.verify(&other.verifying_key().to_bytes()),
        Err(CredentialError::BadCertificate)
    );
    assert!(matches!(
        GroupDevice::new(Arc::new(MemoryKv::new()), &other.to_bytes(), lifted.clone()),
        Err(GroupError::Credential(CredentialError::BadCertificate))
    ));
    // A key package carrying such a credential is refused, state unchanged.
    let bad_kp = GroupDevice::new_unchecked(Arc::new(MemoryKv::new()), &other.to_bytes(), lifted)
        .key_packages(1, NOW)
        .expect("kp")
        .value
        .remove(0);
    assert!(matches!(
        GroupDevice::verify_key_package(&bad_kp),
        Err(GroupError::Credential(CredentialError::BadCertificate))
    ));
    let mut alice = a.device(1);
    alice.create("g");
    let before = alice.snapshot();
    assert!(matches!(
        alice.g().commit(&adds(vec![bad_kp]), NOW),
        Err(GroupError::Credential(CredentialError::BadCertificate))
    ));
    assert!(alice.snapshot() == before);
    assert!(!alice.g().has_pending());
    assert!(matches!(
        DeviceCredential::parse(&[0u8; 10]),
        Err(CredentialError::Malformed)
    ));
    // The registration certificate (zero account) is valid for device 1 only.
    let primary = SigningKey::generate(&mut OsRng);
    let mut cred = a.credential(1, &primary);
    cred.certificate = a
        .identity
        .sign(&auth::device_certificate(
            None,
            &primary.verifying_key().to_bytes(),
        ))
        .to_bytes();
    assert_eq!(cred.verify(&primary.verifying_key().to_bytes()), Ok(()));
    cred.device = DeviceId::new(2).expect("id");
    assert_eq!(
        cred.verify(&primary.verifying_key().to_bytes()),
        Err(CredentialError::BadCertificate)
    );
}

#[test]
fn epoch_records_are_trimmed_to_three_and_tags_to_four() {
    let (a, b) = (Account::new(), Account::new());
    let mut devs = vec![a.device(1), b.device(1)];
    group_of(&mut devs);
    for _ in 0..6 {
        let plan = devs[0].commit(&Changes::default());
        devs[0].apply_pending();
        devs[1].receive(&plan.commit);
    }
    for d in &devs {
        assert_eq!(d.kv.scan(Namespace::MlsEpoch).expect("scan").len(), 3);
        assert_eq!(d.kv.scan(Namespace::MlsTag).expect("scan").len(), 4);
        assert_eq!(d.kv.scan(Namespace::MlsTree).expect("scan").len(), 1);
    }
    // Leaving deletes every record of the group.
    let id = devs[1].g().group_id().to_vec();
    let ops = devs[1].device.forget(&id).expect("forget");
    devs[1].kv.apply(ops, true).expect("apply");
    for ns in [
        Namespace::MlsState,
        Namespace::MlsEpoch,
        Namespace::MlsTree,
        Namespace::MlsTag,
    ] {
        assert!(devs[1].kv.scan(ns).expect("scan").is_empty(), "{ns:?}");
    }
    assert!(devs[1].device.load(&id).expect("load").is_none());
}

#[test]
fn metadata_travels_in_the_welcome_and_in_commits() {
    let (a, b, c) = (Account::new(), Account::new(), Account::new());
    let mut devs = vec![a.device(1), b.device(1)];
    group_of(&mut devs);
    let mut meta = devs[0].g().meta().expect("meta");
    meta.name = "renamed".into();
    meta.description = "a description".into();
    let plan = devs[0].commit(&Changes {
        meta: Some(meta.clone()),
        ..Changes::default()
    });
    assert!(plan.meta_changed);
    devs[0].apply_pending();
    match devs[1].receive(&plan.commit) {
        Processed::Commit(c) => assert_eq!(c.meta.as_ref(), Some(&meta)),
        Processed::Message { .. } => panic!("expected a commit"),
    }
    // The handle cannot change; names have limits.
    let mut moved = meta.clone();
    moved.handle[0] ^= 1;
    assert!(matches!(
        devs[0].g().commit(
            &Changes {
                meta: Some(moved),
                ..Changes::default()
            },
            NOW
        ),
        Err(GroupError::HandleChanged)
    ));
    let mut long = meta.clone();
    long.name = "x".repeat(meta::MAX_NAME + 1);
    assert!(matches!(
        devs[0].g().commit(
            &Changes {
                meta: Some(long),
                ..Changes::default()
            },
            NOW
        ),
        Err(GroupError::MetaTooLong)
    ));
    // A new member gets the metadata and the member tokens in the welcome.
    let mut carol = c.device(1);
    let plan = devs[1].commit(&Changes {
        add: vec![carol.key_package()],
        member_tokens: Some(b"tokens".to_vec()),
        ..Changes::default()
    });
    devs[1].apply_pending();
    let joined = carol.join(&plan.welcome.expect("welcome"));
    assert_eq!(joined.meta, meta);
    assert_eq!(joined.member_tokens.as_deref(), Some(&b"tokens"[..]));
    assert_eq!(joined.added_by.account, b.id);
}

#[test]
fn a_last_resort_key_package_serves_two_joins() {
    let (a, b, c) = (Account::new(), Account::new(), Account::new());
    let mut carol = c.device(1);
    let s = carol.device.last_resort_key_package(NOW).expect("kp");
    let kp = carol.apply(s);
    for account in [&a, &b] {
        let mut owner = account.device(1);
        owner.create("g");
        let plan = owner.commit(&adds(vec![kp.clone()]));
        owner.apply_pending();
        let w = plan.welcome.expect("welcome");
        let s = carol
            .device
            .join(&w.welcome, &w.ratchet_tree, NOW)
            .expect("join");
        carol.apply(s);
    }
    assert_eq!(
        carol.kv.scan(Namespace::MlsKeyPackage).expect("scan").len(),
        1
    );
    let ops = carol.device.forget_key_package(&kp).expect("forget");
    carol.kv.apply(ops, true).expect("apply");
    assert!(carol
        .kv
        .scan(Namespace::MlsKeyPackage)
        .expect("scan")
        .is_empty());
}

#[test]
fn a_one_time_key_package_secret_is_deleted_on_join() {
    let (a, c) = (Account::new(), Account::new());
    let mut carol = c.device(1);
    let kp = carol.key_package();
    assert_eq!(
        carol.kv.scan(Namespace::MlsKeyPackage).expect("scan").len(),
        1
    );
    let mut alice = a.device(1);
    alice.create("g");
    let plan = alice.commit(&adds(vec![kp]));
    alice.apply_pending();
    carol.join(&plan.welcome.expect("welcome"));
    assert!(carol
        .kv
        .scan(Namespace::MlsKeyPackage)
        .expect("scan")
        .is_empty());
}

/// A misbehaving member's commit, made and then dropped on its side.
fn raw_commit(
    dev: &mut Dev,
    build: impl FnOnce(
        mls_rs::group::CommitBuilder<'_, device::MlsConfig>,
    ) -> Result<mls_rs::group::CommitBuilder<'_, device::MlsConfig>, GroupError>,
) -> Vec<u8> {
    let s = dev.g().raw_commit(build).expect("raw commit");
    let commit = dev.apply(s);
    let s = dev.g().clear_pending().expect("clear");
    dev.apply(s);
    commit
}

#[test]
fn a_commit_that_drops_corrupts_or_moves_the_metadata_is_refused_by_every_member() {
    let (a, b, m) = (Account::new(), Account::new(), Account::new());
    let mut devs = vec![a.device(1), b.device(1), m.misbehaving(1)];
    group_of(&mut devs);
    let meta = devs[0].g().meta().expect("meta");
    let mut moved = meta.clone();
    moved.handle[3] ^= 1;
    let mut garbage = mls_rs::ExtensionList::new();
    garbage.set(mls_rs::Extension::new(
        mls_rs::extension::ExtensionType::new(meta::META_EXTENSION),
        vec![0xff; 7],
    ));
    let mut other_handle = mls_rs::ExtensionList::new();
    other_handle.set(moved.extension());
    let cases: Vec<(mls_rs::ExtensionList, Check)> = vec![
        (mls_rs::ExtensionList::new(), |e| {
            matches!(e, GroupError::BadMeta)
        }),
        (garbage, |e| matches!(e, GroupError::BadMeta)),
        (other_handle, |e| matches!(e, GroupError::HandleChanged)),
    ];
    for (list, expected) in cases {
        let commit = raw_commit(&mut devs[2], |c| Ok(c.set_group_context_ext(list)?));
        for honest in devs[..2].iter_mut() {
            let before = honest.snapshot();
            let e = honest.g().process(&commit, NOW).expect_err("refused");
            assert!(expected(&e), "unexpected {e:?}");
            assert!(honest.snapshot() == before, "state changed after {e:?}");
            assert_eq!(honest.g().meta().expect("meta"), meta);
        }
    }
    // The group goes on, and loads from the store as before.
    let next = devs[1].send(b"still here");
    assert_eq!(message_from(devs[0].receive(&next)).1, b"still here");
    devs[0].restart = true;
    devs[0].step();
    assert_eq!(devs[0].g().meta().expect("meta"), meta);
}

#[test]
fn a_leaf_cannot_move_to_another_identity_key() {
    let (a, m, other) = (Account::new(), Account::new(), Account::new());
    let mut devs = vec![a.device(1), m.misbehaving(1)];
    group_of(&mut devs);
    // Mallory's leaf, same account and device, under another identity key that
    // certifies a new device key.
    let key = SigningKey::generate(&mut OsRng);
    let mut moved = m.credential(1, &key);
    moved.identity_key = other.identity.verifying_key().to_bytes();
    moved.certificate = other
        .identity
        .sign(&auth::device_certificate(
            Some(&m.id),
            &key.verifying_key().to_bytes(),
        ))
        .to_bytes();
    moved
        .verify(&key.verifying_key().to_bytes())
        .expect("a valid certificate under the other key");
    let identity = moved.signing_identity(&key.verifying_key().to_bytes());
    let signer = mls_rs::crypto::SignatureSecretKey::new(key.to_keypair_bytes().to_vec());
    let commit = raw_commit(&mut devs[1], |c| {
        Ok(c.set_new_signing_identity(signer, identity))
    });
    let before = devs[0].snapshot();
    assert!(devs[0].g().process(&commit, NOW).is_err());
    assert!(devs[0].snapshot() == before);
    // A new device key under the same identity is a valid successor.
    let key = SigningKey::generate(&mut OsRng);
    let same = m.credential(1, &key);
    let identity = same.signing_identity(&key.verifying_key().to_bytes());
    let signer = mls_rs::crypto::SignatureSecretKey::new(key.to_keypair_bytes().to_vec());
    let commit = raw_commit(&mut devs[1], |c| {
        Ok(c.set_new_signing_identity(signer, identity))
    });
    assert!(matches!(devs[0].receive(&commit), Processed::Commit(_)));
}

#[test]
fn a_welcome_for_a_group_id_of_another_length_is_refused_before_anything_is_stored() {
    let (a, b) = (Account::new(), Account::new());
    let (mut alice, mut bob) = (a.device(1), b.device(1));
    let meta = GroupMeta {
        handle: [7; HANDLE_LEN],
        name: "g".into(),
        ..GroupMeta::default()
    };
    for len in [GROUP_ID_LEN - 1, GROUP_ID_LEN + 1, 1] {
        let s = alice
            .device
            .create_with_id(vec![len as u8; len], &meta, NOW)
            .expect("create");
        alice.group = Some(alice.apply(s));
        let plan = alice.commit(&adds(vec![bob.key_package()]));
        alice.apply_pending();
        let welcome = plan.welcome.expect("welcome");
        let before = bob.snapshot();
        assert!(matches!(
            bob.device
                .join(&welcome.welcome, &welcome.ratchet_tree, NOW),
            Err(GroupError::BadGroupId)
        ));
        assert!(bob.snapshot() == before, "nothing stored");
    }
}

#[test]
fn the_tag_of_the_epoch_after_a_pending_commit_is_known_before_the_answer() {
    let (a, b) = (Account::new(), Account::new());
    let mut devs = vec![a.device(1), b.device(1)];
    group_of(&mut devs);
    assert_eq!(devs[0].g().pending_tag().expect("tag"), None);
    let plan = devs[0].commit(&Changes::default());
    let tag = devs[0].g().pending_tag().expect("tag").expect("pending");
    // Bob applies it (the relay delivered it) and writes in the new epoch.
    devs[1].receive(&plan.commit);
    let next = devs[1].send(b"next epoch");
    assert_eq!(envelope_tag(&next).expect("tag"), tag);
    assert_eq!(devs[0].device.route(&next).expect("route"), None);
    // Known again after a restart.
    devs[0].restart = true;
    devs[0].step();
    assert_eq!(devs[0].g().pending_tag().expect("tag"), Some(tag));
    devs[0].apply_pending();
    assert_eq!(devs[0].g().pending_tag().expect("tag"), None);
    assert!(devs[0].device.route(&next).expect("route").is_some());
    assert_eq!(message_from(devs[0].receive(&next)).1, b"next epoch");
    // A cleared commit leaves no tag.
    devs[0].commit(&Changes::default());
    let s = devs[0].g().clear_pending().expect("clear");
    devs[0].apply(s);
    assert_eq!(devs[0].g().pending_tag().expect("tag"), None);
}

#[test]
fn a_welcome_into_a_group_of_200_devices_fits_one_envelope() {
    // A welcome carries the whole ratchet tree, so the envelope limit bounds the size
    // of a group a new member can join (ARCHITECTURE §11c gives the figure).
    let mut devs: Vec<Dev> = (0..100)
        .flat_map(|_| {
            let a = Account::new();
            [a.device(1), a.device(2)]
        })
        .collect();
    devs[0].create("big");
    let kps: Vec<Vec<u8>> = devs[1..].iter_mut().map(|d| d.key_package()).collect();
    let plan = devs[0].commit(&adds(kps));
    let welcome = plan.welcome.expect("welcome");
    let len = welcome.body().len();
    eprintln!(
        "welcome to 200 devices: {len} B, tree {} B ({} B per leaf)",
        welcome.ratchet_tree.len(),
        welcome.ratchet_tree.len() / 200
    );
    assert!(len <= tern_proto::limits::DEFAULT_MAX_ENVELOPE, "{len}");
    devs[0].apply_pending();
    devs[199].join(&welcome);
    assert_eq!(devs[199].g().members().len(), 200);
}

#[test]
fn a_welcome_into_a_group_of_1000_devices_carries_its_tree_as_an_attachment() {
    // Inline, the tree alone is over the envelope limit: the welcome points at it
    // as an attachment (ARCHITECTURE §11c), and the new device joins with the
    // tree it fetched.
    use tern_proto::limits::DEFAULT_MAX_ENVELOPE;
    let mut devs: Vec<Dev> = (0..500)
        .flat_map(|_| {
            let a = Account::new();
            [a.device(1), a.device(2)]
        })
        .collect();
    // 999 devices, then the thousandth joins.
    let last = devs.len() - 1;
    devs[0].create("huge");
    let kps: Vec<Vec<u8>> = devs[1..last].iter_mut().map(|d| d.key_package()).collect();
    devs[0].commit(&adds(kps));
    devs[0].apply_pending();
    let kp = devs[last].key_package();
    let welcome = devs[0].commit(&adds(vec![kp])).welcome.expect("welcome");
    let inline = welcome.body();
    assert_eq!(inline.len(), welcome.inline_len());
    assert!(inline.len() > DEFAULT_MAX_ENVELOPE, "{}", inline.len());

    // The tree travels as the attachment the welcome points at (its key is in
    // the welcome's GroupInfo).
    let body = welcome.body_with_tree_pointer();
    eprintln!(
        "welcome to 1,000 devices: {} B inline (sealed tree {} B), {} B with a pointer",
        inline.len(),
        welcome.ratchet_tree.len(),
        body.len(),
    );
    // The figures ARCHITECTURE §11c quotes (they move a little with the
    // credentials' random bytes: rounded there).
    assert!(
        (290_000..310_000).contains(&inline.len()),
        "{}",
        inline.len()
    );
    assert!((400..700).contains(&body.len()), "{}", body.len());
    let (w, tree) = parse_welcome(&body[1..]).expect("parses");
    let WelcomeTree::Pointer(got) = tree else {
        panic!("the tree is not inline")
    };
    assert_eq!(got.blob_id, welcome.tree_blob_id);
    assert_eq!(got.sealed_size, welcome.ratchet_tree.len() as u64);
    assert!(matches!(
        devs[last].device.join_body(&body, NOW),
        Err(GroupError::TreeNotInline)
    ));
    let tree = welcome.ratchet_tree.clone();
    devs[0].apply_pending();
    let s = devs[last].device.join(&w, &tree, NOW).expect("join");
    let joined = devs[last].apply(s);
    assert_eq!(joined.added_by.account, devs[0].cred.account);
    devs[last].group = Some(joined.session);
    assert_eq!(devs[last].g().members().len(), 1000);
    let envelope = devs[0].send(b"to a thousand");
    assert!(matches!(
        devs[last].receive(&envelope),
        Processed::Message { content, .. } if content == b"to a thousand"
    ));
}

#[test]
fn a_welcome_body_has_its_tree_inline_or_a_pointer_to_it() {
    let (a, b) = (Account::new(), Account::new());
    let (mut alice, mut bob) = (a.device(1), b.device(1));
    alice.create("g");
    let kp = bob.key_package();
    let welcome = alice.commit(&adds(vec![kp])).welcome.expect("welcome");
    let body = welcome.body();
    assert_eq!(body.len(), welcome.inline_len());
    assert!(matches!(
        parse_welcome(&body[1..]),
        Ok((_, WelcomeTree::Inline(t))) if t == welcome.ratchet_tree
    ));
    let pointer = tern_proto::e2e::AttachmentPointer {
        blob_id: vec![1; 32].into(),
        ..Default::default()
    };
    // Both, or neither: malformed.
    let both = tern_proto::e2e::GroupWelcome {
        welcome: welcome.welcome.clone().into(),
        ratchet_tree: welcome.ratchet_tree.clone().into(),
        ratchet_tree_pointer: Some(pointer),
    };
    let neither = tern_proto::e2e::GroupWelcome {
        welcome: welcome.welcome.clone().into(),
        ..Default::default()
    };
    // A pointer with a key: the key belongs in the GroupInfo only.
    let keyed = tern_proto::e2e::GroupWelcome {
        welcome: welcome.welcome.clone().into(),
        ratchet_tree_pointer: Some(tern_proto::e2e::AttachmentPointer {
            blob_id: vec![1; 32].into(),
            key: vec![2; 32].into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    for w in [both, neither] {
        assert!(matches!(
            parse_welcome(&prost::Message::encode_to_vec(&w)),
            Err(GroupError::Malformed)
        ));
    }
    // Any field but the blob id and sealed size: a typed refusal.
    let bare = tern_proto::e2e::AttachmentPointer {
        blob_id: vec![1; 32].into(),
        sealed_size: 4096,
        ..Default::default()
    };
    let with = |f: &dyn Fn(&mut tern_proto::e2e::AttachmentPointer)| {
        let mut p = bare.clone();
        f(&mut p);
        tern_proto::e2e::GroupWelcome {
            welcome: welcome.welcome.clone().into(),
            ratchet_tree_pointer: Some(p),
            ..Default::default()
        }
    };
    let extras = [
        keyed,
        with(&|p| p.size = 3000),
        with(&|p| p.content_type = "tree".into()),
        with(&|p| p.file_name = "tree".into()),
        with(&|p| p.digest = vec![3; 32].into()),
        with(&|p| p.blob_id = vec![1; 31].into()),
    ];
    for w in extras {
        assert!(matches!(
            parse_welcome(&prost::Message::encode_to_vec(&w)),
            Err(GroupError::BadTreePointer)
        ));
    }
    assert!(matches!(
        parse_welcome(&prost::Message::encode_to_vec(&with(&|_| {}))),
        Ok((
            _,
            WelcomeTree::Pointer(TreePointer {
                sealed_size: 4096,
                ..
            })
        ))
    ));
    assert!(matches!(
        parse_welcome(&[0xff, 0xff]),
        Err(GroupError::Malformed)
    ));
}

#[test]
fn a_device_left_behind_is_re_added_in_one_commit_and_joins_at_the_new_epoch() {
    let (a, b) = (Account::new(), Account::new());
    let mut devs = vec![a.device(1), b.device(1), b.device(2)];
    group_of(&mut devs);
    // Bob's second device misses a commit: the group moves on without it.
    let missed = devs[0].commit(&Changes::default());
    devs[0].apply_pending();
    devs[1].receive(&missed.commit);
    assert_eq!(devs[2].g().epoch(), 1);
    // A lone add of a present device is still left out.
    let kp = devs[2].key_package();
    let plan = devs[0].commit(&adds(vec![kp.clone()]));
    assert!(plan.added.is_empty());
    let s = devs[0].g().clear_pending().expect("clear");
    devs[0].apply(s);
    // Its leaf removed and a fresh one added, in one commit.
    let plan = devs[0].commit(&Changes {
        add: vec![kp],
        remove_devices: vec![(b.id, DeviceId::new(2).expect("device"))],
        ..Changes::default()
    });
    assert_eq!(plan.removed.len(), 1);
    assert_eq!(plan.added.len(), 1);
    assert_eq!(plan.added[0].device.get(), 2);
    // Neither came nor went, but its leaf is new (what a late rejoin request
    // is judged against), for the committer and for the others alike.
    let new_leaf = |c: &CommitApplied| {
        c.new_leaves
            .iter()
            .map(|m| (m.account, m.device.get()))
            .collect::<Vec<_>>()
    };
    let applied = devs[0].apply_pending();
    assert!(applied.added.is_empty() && applied.removed.is_empty());
    assert_eq!(new_leaf(&applied), [(b.id, 2)]);
    let roster = |d: &mut Dev| {
        let mut r: Vec<(AccountId, u32)> = d
            .g()
            .members()
            .iter()
            .map(|m| (m.account, m.device.get()))
            .collect();
        r.sort();
        r
    };
    let before = roster(&mut devs[1]);
    match devs[1].receive(&plan.commit) {
        // The same device back in the same leaf: no member came or went.
        Processed::Commit(c) => {
            assert!(!c.removed_self && c.added.is_empty() && c.removed.is_empty());
            assert_eq!(new_leaf(&c), [(b.id, 2)]);
        }
        Processed::Message { .. } => panic!("expected a commit"),
    }
    assert_eq!(roster(&mut devs[1]), before);
    let joined = devs[2].join(&plan.welcome.expect("welcome"));
    assert_eq!(joined.added_by.account, a.id);
    for d in devs.iter_mut() {
        assert_eq!(d.g().epoch(), 3);
        assert_eq!(d.g().members().len(), 3);
    }
    let m = devs[2].send(b"back");
    assert_eq!(message_from(devs[0].receive(&m)).1, b"back");
    assert_eq!(message_from(devs[1].receive(&m)).1, b"back");
    let m = devs[1].send(b"welcome back");
    assert_eq!(message_from(devs[2].receive(&m)).1, b"welcome back");
}

/// Whether `needle` occurs in `hay`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_welcome_body_shows_the_relay_no_member_and_no_tree_key() {
    // The relay stores the welcome body: inline or as a pointer, it must not
    // learn who is in the group (the tree's credentials) nor the tree's key.
    let (a, b, c) = (Account::new(), Account::new(), Account::new());
    let (mut alice, mut bob, mut carol) = (a.device(1), b.device(1), c.device(1));
    alice.create("g");
    let kp = carol.key_package();
    alice.commit(&adds(vec![kp]));
    alice.apply_pending();
    let kp = bob.key_package();
    let welcome = alice.commit(&adds(vec![kp])).welcome.expect("welcome");
    let key = bob
        .device
        .examine_welcome(&welcome.welcome)
        .expect("examined");
    for body in [welcome.body(), welcome.body_with_tree_pointer()] {
        for (acc, dev) in [(&a, &alice), (&b, &bob), (&c, &carol)] {
            assert!(!contains(&body, &acc.id.0), "an account id");
            assert!(
                !contains(&body, &acc.identity.verifying_key().to_bytes()),
                "an identity key"
            );
            assert!(
                !contains(&body, &dev.key.verifying_key().to_bytes()),
                "a device key"
            );
        }
        assert!(!contains(&body, &key[..]), "the tree key");
    }
    // The inline body joins.
    alice.apply_pending();
    let s = bob.device.join_body(&welcome.body(), NOW).expect("joins");
    let joined = bob.apply(s);
    assert_eq!(joined.session.members().len(), 3);
}

#[test]
fn a_tree_that_does_not_open_under_its_key_is_refused() {
    let (a, b) = (Account::new(), Account::new());
    let (mut alice, mut bob) = (a.device(1), b.device(1));
    alice.create("g");
    let kp = bob.key_package();
    let welcome = alice.commit(&adds(vec![kp])).welcome.expect("welcome");
    // One flipped bit, a cut, or the tree of another welcome (another key).
    let mut flipped = welcome.ratchet_tree.clone();
    flipped[20] ^= 1;
    let cut = welcome.ratchet_tree[..welcome.ratchet_tree.len() - 1].to_vec();
    let (other, _) = tree::seal_tree(&[7; 32], b"not this tree").expect("sealed");
    for bad in [flipped, cut, other, Vec::new()] {
        assert!(matches!(
            bob.device.join(&welcome.welcome, &bad, NOW),
            Err(GroupError::BadTree)
        ));
    }
    // No key in the GroupInfo: refused.
    assert!(matches!(
        tree::tree_key_of(&mls_rs::ExtensionList::new()),
        Err(GroupError::NoTreeKey)
    ));
    // A welcome to another device's key packages does not even examine.
    let mut carol = Account::new().device(1);
    assert!(carol.device.examine_welcome(&welcome.welcome).is_err());
    let _ = carol.key_package();
    assert!(carol.device.examine_welcome(&welcome.welcome).is_err());
}

#[test]
fn a_device_re_added_at_another_index_neither_came_nor_went() {
    let (a, b, c) = (Account::new(), Account::new(), Account::new());
    let mut devs = vec![a.device(1), c.device(1), b.device(1), b.device(2)];
    group_of(&mut devs);
    // Carol leaves a blank leaf at index 1: the fresh leaf of Bob's device 2 goes there.
    let plan = devs[0].commit(&Changes {
        remove_accounts: vec![c.id],
        ..Changes::default()
    });
    devs[0].apply_pending();
    devs[2].receive(&plan.commit);
    devs[3].receive(&plan.commit);
    let index = |d: &mut Dev| {
        d.g()
            .members()
            .iter()
            .find(|m| m.account == b.id && m.device.get() == 2)
            .map(|m| m.index)
    };
    assert_eq!(index(&mut devs[0]), Some(3));
    let kp = devs[3].key_package();
    let plan = devs[0].commit(&Changes {
        add: vec![kp],
        remove_devices: vec![(b.id, DeviceId::new(2).expect("device"))],
        ..Changes::default()
    });
    devs[0].apply_pending();
    assert_eq!(index(&mut devs[0]), Some(1));
    match devs[2].receive(&plan.commit) {
        Processed::Commit(c) => {
            assert!(c.added.is_empty(), "added: {:?}", c.added);
            assert!(c.removed.is_empty(), "removed: {:?}", c.removed);
        }
        Processed::Message { .. } => panic!("expected a commit"),
    }
}

#[test]
fn a_leaf_replaced_under_other_keys_is_an_added_leaf() {
    // A member removes Alice's device 1 and adds, in the same commit, a key package
    // claiming that device under another identity key: the others must see the new
    // leaf as added (so its identity is checked against the pins), not as the same
    // device re-added.
    let (a, b, c) = (Account::new(), Account::new(), Account::new());
    let mut devs = vec![b.device(1), a.device(1), c.device(1)];
    group_of(&mut devs);
    let impostor = Account {
        identity: SigningKey::generate(&mut OsRng),
        id: a.id,
    };
    let kp = impostor.device(1).key_package();
    let plan = devs[0].commit(&Changes {
        add: vec![kp],
        remove_devices: vec![(a.id, DeviceId::new(1).expect("device"))],
        ..Changes::default()
    });
    devs[0].apply_pending();
    match devs[2].receive(&plan.commit) {
        Processed::Commit(c) => {
            assert_eq!(c.added.len(), 1, "added: {:?}", c.added);
            assert_eq!(
                c.added[0].identity_key,
                impostor.identity.verifying_key().to_bytes()
            );
            assert_eq!(c.removed.len(), 1, "removed: {:?}", c.removed);
        }
        Processed::Message { .. } => panic!("expected a commit"),
    }
}
