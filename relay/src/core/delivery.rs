//! The delivery window of one connection: which messages are pushed and not yet
//! acknowledged, and where the next read starts.
//!
//! Call order: [`DeliveryWindow::room`] says how many messages to read after
//! [`DeliveryWindow::cursor`]; each one pushed goes through
//! [`DeliveryWindow::on_pushed`]; acknowledgements go through
//! [`DeliveryWindow::on_acked`]; when a read comes back short, the backlog is
//! drained and [`DeliveryWindow::on_drained`] says whether to tell the client.
//! A connection never pushes the same message twice; unacknowledged messages are
//! pushed again only on the device's next connection.
//!
//! The window is bounded in messages and in payload bytes. An empty window always
//! takes one message, however large, so no message is stuck; otherwise the bytes in
//! flight never exceed the byte bound.

use std::collections::BTreeMap;

/// Unacknowledged deliveries of one connection, bounded for backpressure.
#[derive(Debug, Clone)]
pub struct DeliveryWindow {
    max: usize,
    max_bytes: usize,
    bytes: usize,
    cursor: u64,
    /// Payload bytes of each unacknowledged push.
    in_flight: BTreeMap<u64, usize>,
    announced_empty: bool,
}

impl DeliveryWindow {
    /// A window of at most `max` (at least 1) unacknowledged messages, of any size.
    pub fn new(max: usize) -> Self {
        DeliveryWindow {
            max: max.max(1),
            max_bytes: usize::MAX,
            bytes: 0,
            cursor: 0,
            in_flight: BTreeMap::new(),
            announced_empty: false,
        }
    }

    /// The same window, also bounded to `max_bytes` of unacknowledged payload.
    pub fn with_max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Payload bytes pushed and not acknowledged.
    pub fn bytes_in_flight(&self) -> usize {
        self.bytes
    }

    /// Reads start after this sequence number.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// How many more messages may be pushed now, at most (each push must also fit
    /// the byte bound); 0 once the bytes in flight reach it.
    pub fn room(&self) -> usize {
        if self.bytes >= self.max_bytes {
            return 0;
        }
        self.max - self.in_flight.len()
    }

    /// Unacknowledged pushes.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Records a push of `seq` with `bytes` of payload, which must come after the
    /// cursor. Returns false (and changes nothing) for a message already pushed on
    /// this connection, or when the window is full or the message does not fit it.
    pub fn on_pushed(&mut self, seq: u64, bytes: usize) -> bool {
        if seq <= self.cursor || self.room() == 0 {
            return false;
        }
        let fits = self.bytes.saturating_add(bytes) <= self.max_bytes;
        if !fits && !self.in_flight.is_empty() {
            return false;
        }
        self.cursor = seq;
        self.in_flight.insert(seq, bytes);
        self.bytes = self.bytes.saturating_add(bytes);
        true
    }

    /// Records that the message at `seq` was skipped without a push (expired), so reads
    /// move past it.
    pub fn on_skipped(&mut self, seq: u64) {
        self.cursor = self.cursor.max(seq);
    }

    /// Records an acknowledgement; true if it freed room in the window.
    pub fn on_acked(&mut self, seq: u64) -> bool {
        match self.in_flight.remove(&seq) {
            Some(bytes) => {
                self.bytes -= bytes;
                true
            }
            None => false,
        }
    }

    /// A read found nothing more: returns true the first time, when the client should
    /// be told its queue is empty.
    pub fn on_drained(&mut self) -> bool {
        !std::mem::replace(&mut self.announced_empty, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_bounds_pushes_and_acks_free_room() {
        let mut w = DeliveryWindow::new(2);
        assert_eq!(w.room(), 2);
        assert!(w.on_pushed(5, 1));
        assert!(w.on_pushed(9, 1));
        assert_eq!(w.room(), 0);
        assert!(!w.on_pushed(10, 1), "window full");
        assert_eq!(w.cursor(), 9);
        assert!(w.on_acked(5));
        assert!(!w.on_acked(5), "second ack frees nothing");
        assert!(!w.on_acked(77), "unknown seq frees nothing");
        assert_eq!(w.room(), 1);
        assert!(w.on_pushed(10, 1));
    }

    #[test]
    fn never_pushes_twice_or_backwards() {
        let mut w = DeliveryWindow::new(10);
        assert!(w.on_pushed(3, 1));
        assert!(!w.on_pushed(3, 1));
        assert!(!w.on_pushed(2, 1));
        w.on_skipped(8);
        assert_eq!(w.cursor(), 8);
        assert!(!w.on_pushed(7, 1));
        w.on_skipped(4);
        assert_eq!(w.cursor(), 8, "skips never move the cursor back");
    }

    #[test]
    fn bytes_bound_the_window_but_one_message_always_fits() {
        let mut w = DeliveryWindow::new(10).with_max_bytes(100);
        assert!(w.on_pushed(1, 1000), "an empty window takes any message");
        assert_eq!(w.room(), 0);
        assert!(!w.on_pushed(2, 1));
        assert!(w.on_acked(1));
        assert_eq!(w.bytes_in_flight(), 0);
        assert!(w.on_pushed(2, 60));
        assert!(!w.on_pushed(3, 41), "would pass the byte bound");
        assert_eq!(w.cursor(), 2, "a refused push leaves the cursor");
        assert!(w.on_pushed(3, 40));
        assert_eq!(w.room(), 0, "exactly at the bound");
    }

    proptest::proptest! {
        #[test]
        fn pushed_bytes_never_exceed_the_bound_or_one_message(
            ops in proptest::collection::vec((proptest::bool::ANY, 0usize..300), 0..300),
        ) {
            let mut w = DeliveryWindow::new(8).with_max_bytes(500);
            let mut next = 1;
            let mut largest = 0;
            for (push, size) in ops {
                if push {
                    if w.on_pushed(next, size) {
                        largest = largest.max(size);
                    }
                    next += 1;
                } else if let Some((&seq, _)) = w.in_flight.iter().next() {
                    w.on_acked(seq);
                }
                proptest::prop_assert!(w.bytes_in_flight() <= 500 || w.in_flight() == 1);
                proptest::prop_assert!(w.in_flight() <= 8);
                proptest::prop_assert_eq!(w.bytes_in_flight(), w.in_flight.values().sum::<usize>());
            }
        }
    }

    #[test]
    fn queue_empty_announced_once() {
        let mut w = DeliveryWindow::new(1);
        assert!(w.on_drained());
        assert!(!w.on_drained());
    }
}
