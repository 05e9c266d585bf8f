//! Which wake-ups to send: at most one per device per window, no I/O (time is an
//! argument).
//!
//! Call order: [`Coalescer::on_mail`] for each message queued for a device that is
//! not connected; [`Coalescer::on_seen`] when the device connects;
//! [`Coalescer::on_done`] when a wake-up's POST (with its retries) ended;
//! [`Coalescer::due`] at [`Coalescer::next_deadline`], which also forgets entries
//! that are over.
//!
//! The rule: mail for a device with no entry wakes it at once. Mail within the
//! window of that wake-up is covered by it while the device has not connected since
//! (it will read everything when it does); mail that comes after the device
//! connected and left again is owed a wake-up, sent when the window ends (if the
//! device is still away then). While a POST is in flight, and until a 429's
//! Retry-After has passed, nothing more is sent to that device.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tern_proto::DeviceAddress;

/// What to do with one message's wake-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Send a wake-up now.
    Send,
    /// Covered by a wake-up sent (or owed) in this window.
    Coalesced,
    /// The table is full of live entries: dropped (and counted).
    Full,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The last wake-up's start.
    sent_at: Instant,
    /// A 429 asked to wait until then.
    not_before: Option<Instant>,
    /// A POST (or its retries) is running.
    busy: bool,
    /// The device connected since the last wake-up.
    seen: bool,
    /// Mail came after it connected: a wake-up is owed at the window's end.
    owed: bool,
}

impl Entry {
    /// When the entry may next send.
    fn free_at(&self, window: Duration) -> Instant {
        let end = self.sent_at + window;
        self.not_before.map_or(end, |n| n.max(end))
    }
}

/// Per-device coalescing state, bounded to `max` devices.
#[derive(Debug)]
pub(crate) struct Coalescer {
    window: Duration,
    max: usize,
    entries: HashMap<DeviceAddress, Entry>,
}

impl Coalescer {
    /// At most one wake-up per device per `window`, for at most `max` devices at once.
    pub(crate) fn new(window: Duration, max: usize) -> Self {
        Coalescer {
            window,
            max,
            entries: HashMap::new(),
        }
    }

    /// A message was queued for `addr`, which is not connected.
    pub(crate) fn on_mail(&mut self, addr: DeviceAddress, now: Instant) -> Decision {
        if let Some(e) = self.entries.get_mut(&addr) {
            if e.busy || now < e.free_at(self.window) {
                if e.seen {
                    e.owed = true;
                }
                return Decision::Coalesced;
            }
            *e = Self::fresh(now);
            return Decision::Send;
        }
        if self.entries.len() >= self.max {
            self.forget_over(now);
            if self.entries.len() >= self.max {
                return Decision::Full;
            }
        }
        self.entries.insert(addr, Self::fresh(now));
        Decision::Send
    }

    fn fresh(now: Instant) -> Entry {
        Entry {
            sent_at: now,
            not_before: None,
            busy: true,
            seen: false,
            owed: false,
        }
    }

    /// `addr` connected: mail from now on is owed a wake-up once it leaves.
    pub(crate) fn on_seen(&mut self, addr: &DeviceAddress) {
        if let Some(e) = self.entries.get_mut(addr) {
            e.seen = true;
            e.owed = false;
        }
    }

    /// `addr`'s wake-up ended; with `not_before`, a 429 asked to wait until then.
    pub(crate) fn on_done(&mut self, addr: &DeviceAddress, not_before: Option<Instant>) {
        if let Some(e) = self.entries.get_mut(addr) {
            e.busy = false;
            e.not_before = not_before;
        }
    }

    /// Devices owed a wake-up whose window ended by `now` (each restarted as a new
    /// send: call [`Coalescer::on_done`] for it later); forgets entries that are
    /// over. The caller skips devices that are connected now (and calls `on_done`).
    pub(crate) fn due(&mut self, now: Instant) -> Vec<DeviceAddress> {
        let window = self.window;
        let mut due = Vec::new();
        for (addr, e) in &mut self.entries {
            if e.owed && !e.busy && now >= e.free_at(window) {
                *e = Self::fresh(now);
                due.push(*addr);
            }
        }
        self.forget_over(now);
        due
    }

    /// The next instant [`Coalescer::due`] has work: an owed wake-up or an entry
    /// to forget.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        (self.entries.values())
            .filter(|e| !e.busy)
            .map(|e| e.free_at(self.window))
            .min()
    }

    fn forget_over(&mut self, now: Instant) {
        let window = self.window;
        self.entries
            .retain(|_, e| e.busy || e.owed || now < e.free_at(window));
    }

    /// Devices tracked now.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(a: u8) -> DeviceAddress {
        DeviceAddress::from_wire(&[a; 16], 1).expect("address")
    }

    const W: Duration = Duration::from_secs(10);

    #[test]
    fn a_burst_wakes_once_per_window_and_mail_after_it_wakes_again() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(W, 100);
        assert_eq!(c.on_mail(addr(1), t0), Decision::Send);
        c.on_done(&addr(1), None);
        for i in 1..100 {
            let at = t0 + Duration::from_millis(i * 50);
            assert_eq!(c.on_mail(addr(1), at), Decision::Coalesced, "message {i}");
        }
        assert_eq!(c.on_mail(addr(2), t0), Decision::Send, "per device");
        c.on_done(&addr(2), None);
        assert!(c.due(t0 + W - Duration::from_millis(1)).is_empty());
        // Nothing owed: the device never connected, so the first wake-up covers all.
        assert!(c.due(t0 + W).is_empty());
        assert_eq!(c.len(), 0, "forgotten once over");
        assert_eq!(c.on_mail(addr(1), t0 + W), Decision::Send);
    }

    #[test]
    fn mail_after_the_device_came_and_went_is_owed_at_the_windows_end() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(W, 100);
        assert_eq!(c.on_mail(addr(1), t0), Decision::Send);
        c.on_done(&addr(1), None);
        c.on_seen(&addr(1));
        let t1 = t0 + Duration::from_secs(3);
        assert_eq!(c.on_mail(addr(1), t1), Decision::Coalesced);
        assert_eq!(c.next_deadline(), Some(t0 + W));
        assert!(c.due(t1).is_empty(), "not before the window ends");
        assert_eq!(c.due(t0 + W), vec![addr(1)]);
        assert_eq!(
            c.next_deadline(),
            None,
            "busy again: no deadline until done"
        );
        c.on_done(&addr(1), None);
        assert_eq!(c.next_deadline(), Some(t0 + W + W));
    }

    #[test]
    fn nothing_is_sent_while_a_post_runs_or_before_a_429_allows() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(W, 100);
        assert_eq!(c.on_mail(addr(1), t0), Decision::Send);
        // Still in flight past the window (retries).
        assert_eq!(c.on_mail(addr(1), t0 + W + W), Decision::Coalesced);
        let later = t0 + Duration::from_secs(60);
        c.on_done(&addr(1), Some(later));
        assert_eq!(
            c.on_mail(addr(1), t0 + Duration::from_secs(59)),
            Decision::Coalesced
        );
        assert!(c.due(t0 + Duration::from_secs(30)).is_empty());
        assert_eq!(c.len(), 1, "kept until the 429's wait is over");
        assert_eq!(c.on_mail(addr(1), later), Decision::Send);
    }

    #[test]
    fn the_table_is_bounded_and_frees_entries_that_are_over() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(W, 3);
        for a in 1..=3 {
            assert_eq!(c.on_mail(addr(a), t0), Decision::Send);
            c.on_done(&addr(a), None);
        }
        assert_eq!(c.on_mail(addr(4), t0), Decision::Full);
        assert_eq!(c.len(), 3);
        assert_eq!(c.on_mail(addr(4), t0 + W), Decision::Send, "room again");
        assert_eq!(c.len(), 1);
    }
}
