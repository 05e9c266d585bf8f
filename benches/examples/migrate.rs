//! The `admin migrate` figure: an embedded data directory (sled + the mailbox log)
//! with N queued messages of 1 KiB over N/100 mailboxes, copied into a fresh PostgreSQL
//! (its own server, fsync on) by `tern_relay::admin::migrate::migrate` in a child
//! process of its own, so the peak RSS reported is the migration's alone.
//!
//! `cargo run --release -p tern-benches --example migrate -- 100000`

#![allow(clippy::expect_used, missing_docs)]

use std::process::Command;

use bytes::Bytes;
use tern_platform::clock::{Clock, SystemClock};
use tern_proto::{DeviceAddress, MessageId};
use tern_relay::config::Config;
use tern_relay::store::{
    AccountRecord, AccountStore, Envelope, Flush, LogOptions, LogStore, MailboxStore, SledStore,
};
use tern_relay::testing::TestPostgres;

const PER_MAILBOX: u32 = 100;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        let config = Config {
            data_dir: args[2].clone().into(),
            ..Config::default()
        };
        let migrated =
            tern_relay::admin::migrate::migrate(&config, &args[3], false).expect("migrate");
        println!("{migrated}");
        return;
    }
    let n: u32 = args.get(1).map_or(100_000, |a| a.parse().expect("a count"));
    let dir = tempfile::tempdir().expect("tempdir");
    let seeding = std::time::Instant::now();
    {
        let sled = SledStore::open(&dir.path().join("db"), 64 << 20).expect("sled");
        let log =
            LogStore::open(&dir.path().join("mailboxes"), LogOptions::default()).expect("log");
        let now = SystemClock.now();
        for m in 0..n.div_ceil(PER_MAILBOX) {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&m.to_be_bytes());
            let account = tern_proto::AccountId(id);
            let device = tern_proto::DeviceId::PRIMARY;
            let record = AccountRecord {
                identity_key: [1; 32],
                devices: vec![(device, [2; 32])],
            };
            sled.create_on(&account, &record, Some(20_000))
                .expect("account");
            let to = DeviceAddress { account, device };
            let msgs: Vec<Envelope> = (0..PER_MAILBOX.min(n - m * PER_MAILBOX))
                .map(|i| {
                    let mut mid = [0u8; 16];
                    mid[..4].copy_from_slice(&m.to_be_bytes());
                    mid[4..8].copy_from_slice(&i.to_be_bytes());
                    Envelope {
                        message_id: MessageId(mid),
                        payload: Bytes::from(vec![(i % 251) as u8; 1024]),
                    }
                })
                .collect();
            log.append(&to, &msgs, now, now + 7 * 86_400_000)
                .expect("append");
        }
        log.flush().expect("flush");
        sled.flush().expect("flush");
    }
    println!(
        "seeded {n} messages in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );
    let pg = TestPostgres::start_with(&[("fsync", "on")]);
    pg.create_db("tern");
    let out = Command::new(std::env::current_exe().expect("exe"))
        .arg("--child")
        .arg(dir.path())
        .arg(pg.conn_str("tern"))
        .output()
        .expect("child");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "migration failed");
}
