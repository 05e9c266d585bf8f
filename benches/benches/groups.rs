//! Groups on MLS (the pure core, `tern_client::groups`): encrypting one message to a
//! group of 1000 devices including its staged write (target ≤ 2 ms); a commit that
//! adds one member with 2 devices to a group of 100 members / 200 devices (≤ 20 ms,
//! next-epoch token included) and processing that commit on another member (≤ 5 ms).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ed25519_dalek::{Signer, SigningKey};
use rand::rngs::OsRng;
use rand::RngCore;
use tern_client::groups::{Changes, DeviceCredential, GroupDevice, GroupMeta, GroupSession};
use tern_client::store::{KvStore, MemoryKv};
use tern_proto::{auth, AccountId, DeviceId};

const NOW: u64 = 1_800_000_000_000;

struct Dev {
    kv: Arc<MemoryKv>,
    device: GroupDevice,
}

fn account() -> (SigningKey, AccountId) {
    let mut id = [0u8; 16];
    OsRng.fill_bytes(&mut id);
    (SigningKey::generate(&mut OsRng), AccountId(id))
}

fn device(identity: &SigningKey, account: AccountId, id: u32) -> Dev {
    let key = SigningKey::generate(&mut OsRng);
    let public = key.verifying_key().to_bytes();
    let cred = DeviceCredential {
        account,
        device: DeviceId::new(id).unwrap(),
        identity_key: identity.verifying_key().to_bytes(),
        certificate: identity
            .sign(&auth::device_certificate(Some(&account), &public))
            .to_bytes(),
    };
    let kv = Arc::new(MemoryKv::new());
    let device = GroupDevice::new(kv.clone() as Arc<dyn KvStore>, &key.to_bytes(), cred).unwrap();
    Dev { kv, device }
}

fn key_package(d: &Dev) -> Vec<u8> {
    let s = d.device.key_packages(1, NOW).unwrap();
    d.kv.apply(s.ops, true).unwrap();
    s.value.into_iter().next().unwrap()
}

/// `members` accounts with `per` devices each; the first device creates the group
/// and adds every other device in one commit. Returns the devices (all joined when
/// `join`) and the group id.
fn group(members: usize, per: u32, join: bool) -> (Vec<Dev>, Vec<u8>) {
    let mut devs = Vec::new();
    for _ in 0..members {
        let (identity, account) = account();
        for id in 1..=per {
            devs.push(device(&identity, account, id));
        }
    }
    let mut handle = [0u8; 16];
    OsRng.fill_bytes(&mut handle);
    let mut gid = [0u8; 32];
    OsRng.fill_bytes(&mut gid);
    let meta = GroupMeta {
        handle,
        name: "bench".into(),
        ..GroupMeta::default()
    };
    let s = devs[0].device.create(gid, &meta, NOW).unwrap();
    devs[0].kv.apply(s.ops, true).unwrap();
    let mut g = s.value;
    let add = devs[1..].iter().map(key_package).collect();
    let plan = commit(
        &devs[0],
        &mut g,
        &Changes {
            add,
            ..Changes::default()
        },
    );
    let s = g.apply_pending().unwrap();
    devs[0].kv.apply(s.ops, true).unwrap();
    if join {
        let w = plan.welcome.unwrap();
        for d in &devs[1..] {
            let s = d.device.join(&w.welcome, &w.ratchet_tree, NOW).unwrap();
            d.kv.apply(s.ops, true).unwrap();
        }
    }
    (devs, g.group_id().to_vec())
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn commit(d: &Dev, g: &mut GroupSession, changes: &Changes) -> tern_client::groups::PlannedCommit {
    let s = g.commit(changes, NOW).unwrap();
    d.kv.apply(s.ops, true).unwrap();
    s.value
}

fn encrypt_to_1000_devices(c: &mut Criterion) {
    let (devs, gid) = group(500, 2, false);
    let sender = &devs[0];
    let mut g = sender.device.load(&gid).unwrap().unwrap();
    assert_eq!(g.members().len(), 1000);
    let body = vec![0x55u8; 200];
    let cpu = tern_benches::cpu_per_call(
        200,
        || (),
        |()| {
            let s = g.encrypt(&body).unwrap();
            sender.kv.apply(s.ops, true).unwrap();
            s.value
        },
    );
    eprintln!(
        "encrypt to 1000 devices: {:.3} ms CPU (target ≤ 2 ms)",
        ms(cpu)
    );
    c.bench_function("groups/encrypt 200 B to 1000 devices + staged write", |b| {
        b.iter(|| {
            let s = g.encrypt(&body).unwrap();
            sender.kv.apply(s.ops, true).unwrap();
            s.value
        })
    });
}

fn commit_add_to_200_devices(c: &mut Criterion) {
    let (devs, gid) = group(100, 2, true);
    let (identity, account) = account();
    let newcomer = [device(&identity, account, 1), device(&identity, account, 2)];
    let changes = Changes {
        add: newcomer.iter().map(key_package).collect(),
        ..Changes::default()
    };
    let (committer, other) = (&devs[0], &devs[2]);
    // Nothing is applied inside the loops: each iteration starts from the stored state.
    let cpu = tern_benches::cpu_per_call(
        40,
        || committer.device.load(&gid).unwrap().unwrap(),
        |mut g| g.commit(&changes, NOW).unwrap(),
    );
    eprintln!(
        "commit adding 1 member to 200 devices: {:.3} ms CPU (target ≤ 20 ms)",
        ms(cpu)
    );
    c.bench_function(
        "groups/commit adding 1 member (2 devices) to 200 devices",
        |b| {
            b.iter_batched(
                || committer.device.load(&gid).unwrap().unwrap(),
                |mut g| g.commit(&changes, NOW).unwrap(),
                BatchSize::PerIteration,
            )
        },
    );
    let mut g = committer.device.load(&gid).unwrap().unwrap();
    let plan = commit(committer, &mut g, &changes);
    let cpu = tern_benches::cpu_per_call(
        100,
        || other.device.load(&gid).unwrap().unwrap(),
        |mut g| g.process(&plan.commit, NOW).unwrap(),
    );
    eprintln!(
        "processing it on another member: {:.3} ms CPU (target ≤ 5 ms)",
        ms(cpu)
    );
    c.bench_function("groups/process that commit on another member", |b| {
        b.iter_batched(
            || other.device.load(&gid).unwrap().unwrap(),
            |mut g| g.process(&plan.commit, NOW).unwrap(),
            BatchSize::PerIteration,
        )
    });
}

criterion_group!(benches, encrypt_to_1000_devices, commit_add_to_200_devices);
criterion_main!(benches);
