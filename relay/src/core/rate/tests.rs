use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tern_platform::clock::ManualClock;

use super::*;

fn limit(rate: &str, max_keys: usize) -> (KeyedLimit<u32>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let rate = rate.parse().expect("rate");
    (KeyedLimit::new(rate, max_keys, clock.clone()), clock)
}

fn retry(r: Result<()>) -> u64 {
    match r {
        Err(Error::RateLimited { retry_after_ms }) => retry_after_ms,
        other => panic!("expected RATE_LIMITED, got {other:?}"),
    }
}

#[test]
fn rates_parse_and_print() {
    let r: Rate = "1000/1m".parse().expect("parses");
    assert_eq!(r.burst.get(), 1000);
    assert_eq!(r.period, Duration::from_secs(60));
    assert_eq!(r.to_string(), "1000/1m");
    let d: Rate = " 5 / 1day ".parse().expect("spaces");
    assert_eq!(d.period, Duration::from_secs(86_400));
    for bad in ["", "5", "0/1m", "5/0s", "x/1m", "5/soon", "-1/1m"] {
        assert!(bad.parse::<Rate>().is_err(), "{bad:?}");
    }
}

#[test]
fn a_burst_then_a_refusal_with_the_time_that_works() {
    let (l, clock) = limit("3/1m", 100);
    for _ in 0..3 {
        l.check(&1).expect("within the burst");
    }
    let wait = retry(l.check(&1));
    assert_eq!(wait, 20_000, "one unit refills every 20 s");
    l.check(&2).expect("another key has its own bucket");
    clock.advance(Duration::from_millis(wait - 1));
    assert!(l.check(&1).is_err(), "not a moment early");
    clock.advance(Duration::from_millis(1));
    l.check(&1).expect("at the advised time");
    assert!(l.check(&1).is_err(), "one unit, not a new burst");
    clock.advance(Duration::from_secs(60));
    for _ in 0..3 {
        l.check(&1).expect("a full burst after a quiet period");
    }
}

#[test]
fn amounts_are_all_or_nothing_and_a_huge_one_is_only_slowed() {
    let (l, clock) = limit("10/10s", 100);
    l.check_n(&1, 6).expect("six of ten");
    let wait = retry(l.check_n(&1, 6));
    assert_eq!(wait, 2_000, "two more units refill in 2 s");
    l.check_n(&1, 4)
        .expect("the four left: the refused six took nothing");
    clock.advance(Duration::from_secs(10));
    l.check_n(&1, 50)
        .expect("more than a burst passes after a quiet spell");
    assert!(l.check(&1).is_err(), "...and counts as a whole burst");
    l.check_n(&1, 0).expect("nothing is always fine");
}

#[test]
fn housekeeping_forgets_refilled_keys() {
    let (l, clock) = limit("2/1h", 100);
    for k in 0..50 {
        l.check(&k).expect("fresh keys");
    }
    l.check(&0).expect("second unit of key 0");
    assert_eq!(l.len(), 50);
    l.housekeep();
    assert_eq!(l.len(), 50, "nothing has refilled yet");
    // Governor keeps a key one refill interval (30 min here) past a full bucket.
    clock.advance(Duration::from_secs(3600));
    l.housekeep();
    assert_eq!(l.len(), 1, "only key 0, which took two, is kept");
    clock.advance(Duration::from_secs(1800));
    l.housekeep();
    assert!(l.is_empty());
}

#[test]
fn a_full_table_refuses_new_keys_until_housekeeping() {
    let (l, clock) = limit("1/1m", 3);
    for k in 0..3 {
        l.check(&k).expect("room");
    }
    assert_eq!(retry(l.check(&9)), FULL_TABLE_RETRY_MS, "no room for key 9");
    assert_eq!(retry(l.check(&0)), 60_000, "a held key is limited as usual");
    assert_eq!(l.len(), 3, "the table did not grow");
    clock.advance(Duration::from_secs(120));
    l.check(&1).expect("key 1 refilled and is held");
    l.housekeep();
    assert_eq!(l.len(), 1, "keys 0 and 2 are forgotten, key 1 is not");
    l.check(&9).expect("room again");
}

#[test]
fn byte_rates_of_any_size() {
    let clock = Arc::new(ManualClock::new(5_000));
    let small = ByteRate::new(2000, 10, clock.clone());
    small.check(&1u8, 1500).expect("within a second's bytes");
    let e = small.check(&1, 1500);
    assert!(
        matches!(
            e,
            Err(Error::RateLimited {
                retry_after_ms: 500
            })
        ),
        "{e:?}"
    );
    clock.advance(Duration::from_secs(1));
    small.check(&1, 1500).expect("the next second");
    // A terabyte a second does not fit a u32 of bytes; it still limits.
    let huge = ByteRate::new(1 << 40, 10, clock.clone());
    let almost_half = (1 << 39) - (1 << 30);
    huge.check(&1u8, almost_half).expect("half");
    huge.check(&1, almost_half).expect("the other half");
    assert!(huge.check(&1, 4 << 30).is_err(), "the second is used up");
    clock.advance(Duration::from_secs(1));
    huge.check(&1, 1 << 39).expect("the next second");
}

#[test]
fn prefixes_group_an_ipv6_64_and_keep_ipv4_addresses_apart() {
    let p = |ip: IpAddr| AddressPrefix::from(ip);
    let a: Ipv6Addr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
    let b: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().expect("ip");
    let c: Ipv6Addr = "2001:db8:1:3::1".parse().expect("ip");
    assert_eq!(p(a.into()), p(b.into()), "one /64");
    assert_ne!(p(a.into()), p(c.into()), "another /64");
    let v4 = Ipv4Addr::new(192, 0, 2, 1);
    assert_ne!(p(v4.into()), p(Ipv4Addr::new(192, 0, 2, 2).into()));
    assert_eq!(
        p(v4.to_ipv6_mapped().into()),
        p(v4.into()),
        "mapped is IPv4"
    );
    let shown = format!("{:?} {:?}", p(v4.into()), p(a.into()));
    assert!(!shown.contains("192") && !shown.contains("2001"), "{shown}");
}

#[test]
fn a_forgotten_key_starts_full_and_frees_its_place() {
    let (l, _clock) = limit("2/1h", 2);
    for key in [1, 2] {
        l.check(&key).expect("first");
        l.check(&key).expect("second");
        assert!(l.check(&key).is_err(), "empty");
    }
    assert!(l.check(&3).is_err(), "the table is full");
    l.forget(&1);
    assert_eq!(l.len(), 1);
    assert!(!l.holds(|k| *k == 1));
    l.check(&1).expect("full again after forgetting");
    l.forget_where(|k| *k >= 1);
    assert!(l.is_empty());
    l.check(&3).expect("room again");
}

#[test]
fn forgetting_an_account_drops_every_key_that_names_it() {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let r = RateLimits::new(&crate::config::RateLimitsConfig::default(), clock);
    let (a, b) = (
        tern_proto::AccountId([1; 16]),
        tern_proto::AccountId([2; 16]),
    );
    let dev = |account| tern_proto::DeviceAddress {
        account,
        device: tern_proto::DeviceId::PRIMARY,
    };
    let prefix = AddressPrefix::of(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 32, 64);
    for (me, other) in [(a, b), (b, a)] {
        r.add_device(&me).expect("add device");
        r.send(&SenderKey::Account(me), &dev(other), 1)
            .expect("send");
        r.send(&SenderKey::Prefix(prefix), &dev(me), 1)
            .expect("sealed");
        r.intake(&SenderKey::Account(other), &dev(me), u64::MAX, 1)
            .expect("intake");
        r.fetch_keys(&SenderKey::Account(me)).expect("fetch");
        r.take_one_time_prekey(&dev(me)).expect("prekey");
        r.export(&me).expect("export");
    }
    assert!(r.holds_account(&a) && r.holds_account(&b));
    r.forget_account(&a);
    assert!(!r.holds_account(&a), "nothing keyed by or naming a is left");
    assert!(r.holds_account(&b));
}

#[test]
fn a_fifth_export_in_a_day_is_refused_with_a_retry_time() {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let r = RateLimits::new(&crate::config::RateLimitsConfig::default(), clock.clone());
    let a = tern_proto::AccountId([1; 16]);
    for _ in 0..4 {
        r.export(&a).expect("within the default 4/1day");
    }
    let refused = r.export(&a).expect_err("the fifth");
    assert_eq!(refused.code(), tern_proto::ErrorCode::RateLimited);
    assert!(matches!(
        refused,
        crate::Error::RateLimited { retry_after_ms } if retry_after_ms > 0
    ));
    r.export(&tern_proto::AccountId([2; 16]))
        .expect("another account's own limit");
    clock.advance(std::time::Duration::from_secs(6 * 3600));
    r.export(&a).expect("a quarter of a day refills one");
}

#[test]
fn a_rate_change_starts_every_bucket_afresh_and_locks_out_no_one() {
    let (l, clock) = limit("3/1m", 100);
    // Key 1 stays active a long while before the reload: a limiter built later
    // must not read its stored times as lying in the future.
    for _ in 0..50 {
        l.check(&1).expect("one a minute fits");
        clock.advance(Duration::from_secs(60));
    }
    l.check(&2).expect("a second key");
    assert_eq!(l.len(), 2);
    l.set_rate("10/1m".parse().expect("rate"));
    assert_eq!(l.len(), 0, "a rate change forgets the old buckets");
    for _ in 0..10 {
        l.check(&1)
            .expect("a looser rate admits the active key at once");
    }
    assert!(l.check(&1).is_err(), "and only as far as the new burst");
    l.set_rate("10/1m".parse().expect("rate"));
    assert!(l.check(&1).is_err(), "the same rate again changes nothing");
}
