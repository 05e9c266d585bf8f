//! The delivery service's rules over a memory store on a manual clock.

use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tern_proto::{
    AccountId, CommitId, DeviceAddress, DeviceId, GroupCommit, GroupHandle, MessageId, MultiSend,
    RecipientAccount,
};

use super::PackageRequester;
use crate::config::RateLimitsConfig;
use crate::core::auth::AuthenticatedDevice;
use crate::core::limits::Limits;
use crate::core::rate::AddressPrefix;
use crate::error::Error;
use crate::store::{KeyPackageStore, MailboxStore};
use crate::testing::{device, fixture, fixture_with, Fixture};

const DAY: Duration = Duration::from_secs(86_400);

pub(super) fn from(ip: [u8; 4]) -> AddressPrefix {
    AddressPrefix::from(std::net::IpAddr::from(ip))
}

fn kp(i: u8) -> Bytes {
    Bytes::from(vec![i; 100])
}

fn with_token(token: &[u8]) -> PackageRequester<'_> {
    PackageRequester {
        token,
        device: None,
        from: from([10, 0, 0, 1]),
    }
}

fn ids(fetched: &[tern_proto::FetchedKeyPackage]) -> Vec<(u8, bool)> {
    fetched
        .iter()
        .map(|p| (p.key_package[0], p.last_resort))
        .collect()
}

pub(super) async fn bob(f: &Fixture) -> AuthenticatedDevice {
    let bob = device(f, 2).await;
    f.set_token(&bob, b"bob's token").await;
    bob
}

#[tokio::test]
async fn key_packages_are_handed_out_once_then_the_last_resort() {
    let f = fixture(Limits::default());
    let bob = bob(&f).await;
    let account = bob.address().account;
    let groups = f.services.groups();
    let stored = groups
        .publish_key_packages(&bob, &[kp(1), kp(2)], Some(&kp(99)), false)
        .await
        .expect("publish");
    assert_eq!(stored, 2);
    let mut got = Vec::new();
    for _ in 0..4 {
        let fetched = groups
            .fetch_key_packages(with_token(b"bob's token"), &account, None)
            .await
            .expect("fetch");
        assert_eq!(fetched[0].device, DeviceId::PRIMARY);
        got.extend(ids(&fetched));
    }
    assert_eq!(
        got,
        vec![(1, false), (2, false), (99, true), (99, true)],
        "each once, oldest first, then the last resort"
    );
    // A wrong token and an unknown account look the same, and take nothing.
    groups
        .publish_key_packages(&bob, &[kp(3)], None, false)
        .await
        .expect("publish");
    for (token, account) in [
        (&b"wrong"[..], account),
        (b"bob's token", AccountId([0xee; 16])),
    ] {
        let refused = groups
            .fetch_key_packages(with_token(token), &account, None)
            .await;
        assert!(matches!(refused, Err(Error::Unauthorized)), "{refused:?}");
    }
    assert_eq!(
        f.store
            .key_package_counts(bob.address())
            .expect("counts")
            .one_time,
        1
    );
}

#[tokio::test]
async fn the_pool_is_capped_and_replace_starts_it_over() {
    let f = fixture(Limits::default());
    let bob = bob(&f).await;
    let groups = f.services.groups();
    let many: Vec<Bytes> = (0..150).map(|i| kp(i as u8)).collect();
    groups
        .publish_key_packages(&bob, &many, None, false)
        .await
        .expect("150");
    let refused = groups
        .publish_key_packages(&bob, &many[..51], None, false)
        .await;
    assert!(
        matches!(
            refused,
            Err(Error::TooLarge {
                size: 201,
                max: 200,
                ..
            })
        ),
        "{refused:?}"
    );
    let stored = groups
        .publish_key_packages(&bob, &many[..100], Some(&kp(99)), true)
        .await
        .expect("replace");
    assert_eq!(stored, 100, "the old pool is gone");
}

#[tokio::test]
async fn past_the_device_rate_a_fetch_gets_the_last_resort() {
    let rates = RateLimitsConfig {
        key_packages_per_device: "2/1day".parse().expect("rate"),
        ..RateLimitsConfig::default()
    };
    let f = fixture_with(Limits::default(), &rates);
    let bob = bob(&f).await;
    let account = bob.address().account;
    let groups = f.services.groups();
    groups
        .publish_key_packages(&bob, &[kp(1), kp(2), kp(3), kp(4)], Some(&kp(99)), false)
        .await
        .expect("publish");
    let fetch = || async {
        let f = groups
            .fetch_key_packages(with_token(b"bob's token"), &account, None)
            .await
            .expect("fetch");
        ids(&f)
    };
    assert_eq!(fetch().await, vec![(1, false)]);
    assert_eq!(fetch().await, vec![(2, false)]);
    assert_eq!(fetch().await, vec![(99, true)], "the drain stops here");
    assert_eq!(
        f.store
            .key_package_counts(bob.address())
            .expect("counts")
            .one_time,
        2
    );
    f.clock.advance(DAY / 2);
    assert_eq!(fetch().await, vec![(3, false)], "half a day refills one");
}

#[tokio::test]
async fn fetches_count_against_the_requester_and_cover_each_device() {
    let rates = RateLimitsConfig {
        fetch_keys_per_requester: "3/1h".parse().expect("rate"),
        ..RateLimitsConfig::default()
    };
    let f = fixture_with(Limits::default(), &rates);
    let bob = bob(&f).await;
    let account = bob.address().account;
    let groups = f.services.groups();
    let laptop = linked(&f, &bob).await;
    let second = laptop.address().device;
    groups
        .publish_key_packages(&bob, &[kp(1)], None, false)
        .await
        .expect("publish");
    groups
        .publish_key_packages(&laptop, &[kp(2)], Some(&kp(98)), false)
        .await
        .expect("publish");
    let all = groups
        .fetch_key_packages(with_token(b"bob's token"), &account, None)
        .await
        .expect("all devices");
    assert_eq!(ids(&all), vec![(1, false), (2, false)]);
    let one = groups
        .fetch_key_packages(with_token(b"bob's token"), &account, Some(second))
        .await
        .expect("one device");
    assert_eq!(ids(&one), vec![(98, true)]);
    let unknown = groups
        .fetch_key_packages(with_token(b"bob's token"), &account, DeviceId::new(9))
        .await;
    assert!(
        matches!(unknown, Err(Error::UnknownRecipient)),
        "{unknown:?}"
    );
    // Wrong tokens count too: guessing costs the same rate.
    let limited = groups
        .fetch_key_packages(with_token(b"guess"), &account, None)
        .await;
    assert!(
        matches!(limited, Err(Error::RateLimited { .. })),
        "{limited:?}"
    );
}

/// A linked second device of `by`'s account (registered with seed 2), signed in.
async fn linked(f: &Fixture, by: &AuthenticatedDevice) -> AuthenticatedDevice {
    use ed25519_dalek::Signer;
    let key = ed25519_dalek::SigningKey::from_bytes(&[61; 32]);
    let id = f
        .add_device(by, 2, key.verifying_key().to_bytes())
        .await
        .expect("linked");
    let at = DeviceAddress {
        account: by.address().account,
        device: id,
    };
    let exporter = [3u8; 32];
    let proof = key.sign(&tern_proto::auth::session_proof(&exporter));
    f.services
        .accounts()
        .authenticate(at, &exporter, &proof.to_bytes())
        .expect("auth")
}

pub(super) fn token_hash(token: &[u8; 32]) -> [u8; 32] {
    Sha256::digest(token).into()
}

pub(super) const HANDLE: GroupHandle = GroupHandle([5; 16]);

/// A commit at `epoch` with epoch token `[epoch; 32]`, moving to `[epoch + 1; 32]`,
/// delivering message `id` to Bob's primary.
pub(super) fn commit(bob: &AuthenticatedDevice, epoch: u8, id: u8) -> GroupCommit {
    GroupCommit {
        handle: HANDLE,
        epoch: u64::from(epoch),
        epoch_token: [epoch; 32],
        next_token_hash: token_hash(&[epoch + 1; 32]),
        commit_id: CommitId([id; 16]),
        sends: vec![MultiSend {
            message_id: MessageId([id; 16]),
            body: Bytes::from(vec![id; 40]),
            recipients: vec![RecipientAccount {
                account: bob.address().account,
                delivery_token: Bytes::from_static(b"bob's token"),
                device_list_version: 0,
                devices: vec![DeviceId::PRIMARY],
                parts: Vec::new(),
            }],
        }],
    }
}

pub(super) fn queued(f: &Fixture, bob: &AuthenticatedDevice) -> u64 {
    f.store.usage(bob.address()).expect("usage").messages
}

#[tokio::test]
async fn commits_follow_the_epoch_rules() {
    let f = fixture(Limits::default());
    let bob = bob(&f).await;
    let groups = f.services.groups();
    let at = from([10, 0, 0, 7]);
    groups
        .create(&HANDLE, &token_hash(&[0; 32]), at)
        .await
        .expect("create");
    let services = &f.services;
    let run = |c: GroupCommit| async move { groups.commit(services, &c, at).await };

    // The current epoch with its token: the sends are stored, the epoch moves on.
    let (epoch, results) = run(commit(&bob, 0, 1)).await.expect("commit");
    assert_eq!(epoch, 1);
    assert_eq!(results.len(), 1);
    assert_eq!((results[0].accepted, results[0].refused.len()), (1, 0));
    assert_eq!(queued(&f, &bob), 1);

    // A retry of that commit (its answer lost): OK, nothing appended again.
    let (epoch, results) = run(commit(&bob, 0, 1)).await.expect("retry");
    assert_eq!((epoch, results.len()), (1, 0));
    assert_eq!(queued(&f, &bob), 1, "no second append");

    // Another commit made at epoch 0 lost the race: STALE_EPOCH with the current one.
    for stale in [commit(&bob, 0, 2), commit(&bob, 7, 3)] {
        let refused = run(stale).await;
        assert!(
            matches!(refused, Err(Error::StaleEpoch { current: 1 })),
            "{refused:?}"
        );
    }
    // A wrong token (a removed member) and an unknown handle look the same.
    let mut wrong = commit(&bob, 1, 4);
    wrong.epoch_token = [0; 32];
    let mut unknown = commit(&bob, 1, 4);
    unknown.handle = GroupHandle([6; 16]);
    for refused in [run(wrong).await, run(unknown).await] {
        assert!(matches!(refused, Err(Error::UnknownGroup)), "{refused:?}");
    }
    assert_eq!(queued(&f, &bob), 1, "refused commits store nothing");

    // The next epoch's token, as the last commit set it.
    let (epoch, _) = run(commit(&bob, 1, 5)).await.expect("next");
    assert_eq!(epoch, 2);
    assert_eq!(queued(&f, &bob), 2);
    // The retry window is the last commit only.
    let old = run(commit(&bob, 0, 1)).await;
    assert!(
        matches!(old, Err(Error::StaleEpoch { current: 2 })),
        "{old:?}"
    );
}

#[tokio::test]
async fn refused_recipients_are_reported_and_the_epoch_still_moves() {
    let f = fixture(Limits::default());
    let bob = bob(&f).await;
    let groups = f.services.groups();
    let at = from([10, 0, 0, 7]);
    groups
        .create(&HANDLE, &token_hash(&[0; 32]), at)
        .await
        .expect("create");
    let mut c = commit(&bob, 0, 1);
    c.sends[0].recipients[0].delivery_token = Bytes::from_static(b"stale token");
    let (epoch, results) = groups.commit(&f.services, &c, at).await.expect("commit");
    assert_eq!(epoch, 1);
    assert_eq!(results[0].accepted, 0);
    assert_eq!(results[0].refused.len(), 1);
    assert_eq!(results[0].refused[0].device, None, "the whole account");
    assert_eq!(queued(&f, &bob), 0);
}

#[tokio::test]
async fn of_two_concurrent_commits_exactly_one_wins() {
    let f = fixture(Limits::default());
    let bob = bob(&f).await;
    let groups = f.services.groups();
    let at = from([10, 0, 0, 7]);
    groups
        .create(&HANDLE, &token_hash(&[0; 32]), at)
        .await
        .expect("create");
    let (a, b) = (commit(&bob, 0, 1), commit(&bob, 0, 2));
    let (ra, rb) = tokio::join!(
        groups.commit(&f.services, &a, at),
        groups.commit(&f.services, &b, at)
    );
    let won = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{ra:?} {rb:?}");
    let lost = if ra.is_ok() { rb } else { ra };
    assert!(
        matches!(lost, Err(Error::StaleEpoch { current: 1 })),
        "{lost:?}"
    );
    assert_eq!(queued(&f, &bob), 1, "only the winner's commit is stored");
    assert_eq!(groups.locks.len(), 0, "no lock outlives its commit");
}

#[tokio::test]
async fn create_is_once_per_handle_and_limited_per_prefix() {
    let rates = RateLimitsConfig {
        create_groups_per_prefix: "2/1h".parse().expect("rate"),
        ..RateLimitsConfig::default()
    };
    let f = fixture_with(Limits::default(), &rates);
    let groups = f.services.groups();
    let at = from([10, 0, 0, 7]);
    groups.create(&HANDLE, &[1; 32], at).await.expect("create");
    let taken = groups.create(&HANDLE, &[2; 32], at).await;
    assert!(matches!(taken, Err(Error::GroupExists)), "{taken:?}");
    let limited = groups.create(&GroupHandle([7; 16]), &[1; 32], at).await;
    assert!(
        matches!(limited, Err(Error::RateLimited { .. })),
        "{limited:?}"
    );
    groups
        .create(&GroupHandle([7; 16]), &[1; 32], from([10, 0, 0, 8]))
        .await
        .expect("another prefix");
}

#[tokio::test]
async fn idle_handles_are_swept_and_commits_keep_them() {
    let rates = RateLimitsConfig {
        group_idle_days: 10,
        ..RateLimitsConfig::default()
    };
    let f = fixture_with(Limits::default(), &rates);
    let bob = bob(&f).await;
    let groups = f.services.groups();
    let at = from([10, 0, 0, 7]);
    groups
        .create(&HANDLE, &token_hash(&[0; 32]), at)
        .await
        .expect("create");
    groups
        .create(&GroupHandle([8; 16]), &[0; 32], at)
        .await
        .expect("create another");
    f.clock.advance(DAY * 9);
    groups
        .commit(&f.services, &commit(&bob, 0, 1), at)
        .await
        .expect("commit");
    f.clock.advance(DAY * 2);
    assert_eq!(
        groups.sweep(100).expect("sweep"),
        1,
        "the other one, idle 11 days"
    );
    f.clock.advance(DAY * 8);
    assert_eq!(
        groups.sweep(100).expect("sweep"),
        0,
        "10 days since its commit"
    );
    f.clock.advance(DAY);
    assert_eq!(groups.sweep(100).expect("sweep"), 1);
    let gone = groups.commit(&f.services, &commit(&bob, 1, 2), at).await;
    assert!(matches!(gone, Err(Error::UnknownGroup)), "{gone:?}");
}

#[tokio::test]
async fn a_zero_idle_days_never_sweeps() {
    let rates = RateLimitsConfig {
        group_idle_days: 0,
        ..RateLimitsConfig::default()
    };
    let f = fixture_with(Limits::default(), &rates);
    let groups = f.services.groups();
    groups
        .create(&HANDLE, &[0; 32], from([10, 0, 0, 7]))
        .await
        .expect("create");
    f.clock.advance(DAY * 5000);
    assert_eq!(groups.sweep(100).expect("sweep"), 0);
}

/// [`commit`] with a second send (the welcome) of `welcome_len` bytes to Bob.
pub(super) fn commit_with_welcome(
    bob: &AuthenticatedDevice,
    epoch: u8,
    id: u8,
    welcome_len: usize,
) -> GroupCommit {
    let mut c = commit(bob, epoch, id);
    let mut welcome = c.sends[0].clone();
    welcome.message_id = MessageId([id.wrapping_add(100); 16]);
    welcome.body = Bytes::from(vec![0xEE; welcome_len]);
    c.sends.push(welcome);
    c
}

pub(super) async fn created(f: &Fixture, at: AddressPrefix) {
    f.services
        .groups()
        .create(&HANDLE, &token_hash(&[0; 32]), at)
        .await
        .expect("create");
}

#[tokio::test]
async fn a_welcome_over_the_envelope_size_refuses_the_commit_before_anything_is_stored() {
    let f = fixture(Limits {
        max_envelope_bytes: 100,
        ..Limits::default()
    });
    let bob = bob(&f).await;
    let at = from([10, 0, 0, 7]);
    created(&f, at).await;
    let groups = f.services.groups();
    let refused = groups
        .commit(&f.services, &commit_with_welcome(&bob, 0, 1, 101), at)
        .await;
    assert!(
        matches!(refused, Err(Error::TooLarge { .. })),
        "{refused:?}"
    );
    assert_eq!(queued(&f, &bob), 0, "the commit was not stored either");
    // The epoch did not move: the same epoch's commit, fixed, goes through.
    let (epoch, results) = groups
        .commit(&f.services, &commit_with_welcome(&bob, 0, 1, 100), at)
        .await
        .expect("commit");
    assert_eq!((epoch, results.len()), (1, 2));
    assert_eq!(queued(&f, &bob), 2);
}

#[tokio::test]
async fn a_commit_takes_the_prefix_rate_once_for_all_its_sends() {
    let rates = RateLimitsConfig {
        sealed_sends_per_prefix: "1/1h".parse().expect("rate"),
        ..RateLimitsConfig::default()
    };
    let f = fixture_with(Limits::default(), &rates);
    let bob = bob(&f).await;
    let at = from([10, 0, 0, 7]);
    created(&f, at).await;
    let groups = f.services.groups();
    let (epoch, results) = groups
        .commit(&f.services, &commit_with_welcome(&bob, 0, 1, 50), at)
        .await
        .expect("two sends, one unit");
    assert_eq!(epoch, 1);
    assert!(results.iter().all(|r| r.accepted == 1), "{results:?}");
    // The next one is over the rate: refused whole, nothing stored, epoch kept.
    let limited = groups
        .commit(&f.services, &commit_with_welcome(&bob, 1, 2, 50), at)
        .await;
    assert!(
        matches!(limited, Err(Error::RateLimited { .. })),
        "{limited:?}"
    );
    assert_eq!(queued(&f, &bob), 2);
}

#[tokio::test]
async fn a_welcome_past_the_relay_budget_is_refused_in_the_answer_and_the_epoch_moves() {
    let budget = crate::core::budget::Budget::new(crate::core::budget::BudgetLimits {
        max_queued_messages: 1,
        ..Default::default()
    });
    let f = crate::testing::fixture_with_budget(
        Limits::default(),
        &RateLimitsConfig::default(),
        std::sync::Arc::new(budget),
    );
    let bob = bob(&f).await;
    let at = from([10, 0, 0, 7]);
    created(&f, at).await;
    let groups = f.services.groups();
    let (epoch, results) = groups
        .commit(&f.services, &commit_with_welcome(&bob, 0, 1, 50), at)
        .await
        .expect("the commit is stored, so the epoch moves");
    assert_eq!(epoch, 1);
    assert_eq!(results[0].accepted, 1);
    assert_eq!(results[1].accepted, 0);
    assert_eq!(
        results[1].refused,
        vec![tern_proto::Refused {
            recipient: 0,
            device: None,
            code: tern_proto::ErrorCode::Unavailable,
        }]
    );
    assert_eq!(queued(&f, &bob), 1);
}

#[tokio::test]
async fn a_member_at_its_intake_and_sealed_rates_still_gets_the_commit_and_welcome() {
    let rates = RateLimitsConfig {
        sealed_sends_per_token: "2/1h".parse().expect("rate"),
        intake_per_sender_per_mailbox: "2/1h".parse().expect("rate"),
        intake_above_queued: 0,
        ..RateLimitsConfig::default()
    };
    let f = fixture_with(Limits::default(), &rates);
    let bob = bob(&f).await;
    let at = from([127, 0, 0, 1]);
    created(&f, at).await;
    // Bob's account's sealed rate and his mailbox's intake from this prefix, spent.
    f.sealed_send(
        *bob.address(),
        b"bob's token",
        &crate::testing::msgs(0..2, 10),
    )
    .await
    .expect("two sealed sends");
    let plain =
        crate::mailboxes::append_multi(&f.services, &commit(&bob, 0, 9).sends[0], at, false)
            .expect("send")
            .commit()
            .await
            .expect("answered");
    assert_eq!(plain.refused[0].code, tern_proto::ErrorCode::RateLimited);
    // The commit and its welcome are bounded by the reserve, not by those rates.
    let (epoch, results) = f
        .services
        .groups()
        .commit(&f.services, &commit_with_welcome(&bob, 0, 1, 50), at)
        .await
        .expect("commit");
    assert_eq!(epoch, 1);
    assert!(
        results
            .iter()
            .all(|r| r.accepted == 1 && r.refused.is_empty()),
        "{results:?}"
    );
    assert_eq!(queued(&f, &bob), 4);
}

#[tokio::test]
async fn commit_entries_into_a_full_mailbox_are_bounded_per_device() {
    let rates = RateLimitsConfig {
        group_commits_per_device: "2/1h".parse().expect("rate"),
        intake_above_queued: 0,
        ..RateLimitsConfig::default()
    };
    let f = fixture_with(Limits::default(), &rates);
    let bob = bob(&f).await;
    let at = from([127, 0, 0, 1]);
    created(&f, at).await;
    let groups = f.services.groups();
    let (epoch, results) = groups
        .commit(&f.services, &commit_with_welcome(&bob, 0, 1, 50), at)
        .await
        .expect("commit");
    assert_eq!(epoch, 1);
    assert!(results.iter().all(|r| r.accepted == 1), "{results:?}");
    // Two entries spent the device's allowance: the next commit moves the epoch,
    // and its entry for Bob is refused (the committer sends it again later).
    let (epoch, results) = groups
        .commit(&f.services, &commit(&bob, 1, 2), at)
        .await
        .expect("commit");
    assert_eq!(epoch, 2);
    assert_eq!(results[0].accepted, 0);
    assert_eq!(
        results[0].refused,
        vec![tern_proto::Refused {
            recipient: 0,
            device: Some(DeviceId::PRIMARY),
            code: tern_proto::ErrorCode::RateLimited,
        }]
    );
    assert_eq!(queued(&f, &bob), 2);
}

#[tokio::test]
async fn past_max_groups_a_create_is_refused_until_the_sweep_makes_room() {
    let rates = RateLimitsConfig {
        max_groups: 2,
        group_idle_days: 10,
        ..RateLimitsConfig::default()
    };
    let f = fixture_with(Limits::default(), &rates);
    let groups = f.services.groups();
    let at = from([10, 0, 0, 7]);
    groups
        .create(&GroupHandle([1; 16]), &[0; 32], at)
        .await
        .expect("first");
    f.clock.advance(DAY * 5);
    groups
        .create(&GroupHandle([2; 16]), &[0; 32], at)
        .await
        .expect("second");
    let full = groups.create(&GroupHandle([3; 16]), &[0; 32], at).await;
    assert!(matches!(full, Err(Error::StorageFull { .. })), "{full:?}");
    assert_eq!(
        full.expect_err("full").code(),
        tern_proto::ErrorCode::Unavailable
    );
    // A taken handle is no room either way; the refused one was not stored.
    let taken = groups.create(&GroupHandle([1; 16]), &[0; 32], at).await;
    assert!(matches!(taken, Err(Error::StorageFull { .. })), "{taken:?}");
    f.clock.advance(DAY * 6);
    assert_eq!(
        groups.sweep(100).expect("sweep"),
        1,
        "the first, idle 11 days"
    );
    groups
        .create(&GroupHandle([3; 16]), &[0; 32], at)
        .await
        .expect("room again");
    let full = groups.create(&GroupHandle([4; 16]), &[0; 32], at).await;
    assert!(matches!(full, Err(Error::StorageFull { .. })), "{full:?}");
}

/// Group epochs in memory, swept (every handle) just before each locked move: the
/// sweeper running while a commit appends.
struct SweptDuringCommit(std::sync::Arc<crate::store::MemoryStore>);

impl crate::store::GroupStore for SweptDuringCommit {
    fn insert_group(
        &self,
        handle: &crate::store::HandleBytes,
        state: &crate::store::GroupState,
    ) -> crate::store::StoreResult<()> {
        self.0.insert_group(handle, state)
    }
    fn group(
        &self,
        handle: &crate::store::HandleBytes,
    ) -> crate::store::StoreResult<Option<crate::store::GroupState>> {
        self.0.group(handle)
    }
    fn advance_group(
        &self,
        handle: &crate::store::HandleBytes,
        from: &crate::store::GroupState,
        to: &crate::store::GroupState,
    ) -> crate::store::StoreResult<bool> {
        self.0.sweep_groups(u32::MAX, 100)?;
        self.0.advance_group(handle, from, to)
    }
    fn sweep_groups(&self, before_day: u32, max: usize) -> crate::store::StoreResult<u64> {
        self.0.sweep_groups(before_day, max)
    }
    fn groups_after(
        &self,
        after: Option<&crate::store::HandleBytes>,
        max: usize,
    ) -> crate::store::StoreResult<Vec<(crate::store::HandleBytes, crate::store::GroupState)>> {
        self.0.groups_after(after, max)
    }
    fn count_groups(&self) -> crate::store::StoreResult<u64> {
        self.0.count_groups()
    }
}

#[tokio::test]
async fn a_handle_swept_while_its_commit_is_appended_comes_back_at_the_new_epoch() {
    use crate::store::GroupStore;
    let memory = std::sync::Arc::new(crate::store::MemoryStore::new());
    let mut stores = crate::store::Stores::all(memory.clone());
    stores.groups = std::sync::Arc::new(SweptDuringCommit(memory.clone()));
    let f = crate::testing::fixture_on(stores, memory.clone());
    let bob = bob(&f).await;
    let at = from([10, 0, 0, 7]);
    created(&f, at).await;
    let (epoch, results) = f
        .services
        .groups()
        .commit(&f.services, &commit(&bob, 0, 1), at)
        .await
        .expect("the commit is delivered, so it stands");
    assert_eq!((epoch, results[0].accepted), (1, 1));
    let state = memory.group(&HANDLE.0).expect("read").expect("back");
    assert_eq!(state.epoch, 1);
    assert_eq!(state.token_hash, token_hash(&[1; 32]));
}
