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

use std::collections::BTreeSet;

/// Unacknowledged deliveries of one connection, bounded for backpressure.
#[derive(Debug, Clone)]
pub struct DeliveryWindow {
    max: usize,
    cursor: u64,
    in_flight: BTreeSet<u64>,
    announced_empty: bool,
}

impl DeliveryWindow {
    /// A window of at most `max` (at least 1) unacknowledged messages.
    pub fn new(max: usize) -> Self {
        DeliveryWindow {
            max: max.max(1),
            cursor: 0,
            in_flight: BTreeSet::new(),
            announced_empty: false,
        }
    }

    /// Reads start after this sequence number.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// How many more messages may be pushed now.
    pub fn room(&self) -> usize {
        self.max - self.in_flight.len()
    }

    /// Unacknowledged pushes.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Records a push of `seq`, which must come after the cursor. Returns false (and
    /// changes nothing) for a message already pushed on this connection, or when the
    /// window is full.
    pub fn on_pushed(&mut self, seq: u64) -> bool {
        if seq <= self.cursor || self.room() == 0 {
            return false;
        }
        self.cursor = seq;
        self.in_flight.insert(seq);
        true
    }

    /// Records that the message at `seq` was skipped without a push (expired), so reads
    /// move past it.
    pub fn on_skipped(&mut self, seq: u64) {
        self.cursor = self.cursor.max(seq);
    }

    /// Records an acknowledgement; true if it freed room in the window.
    pub fn on_acked(&mut self, seq: u64) -> bool {
        self.in_flight.remove(&seq)
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
        assert!(w.on_pushed(5));
        assert!(w.on_pushed(9));
        assert_eq!(w.room(), 0);
        assert!(!w.on_pushed(10), "window full");
        assert_eq!(w.cursor(), 9);
        assert!(w.on_acked(5));
        assert!(!w.on_acked(5), "second ack frees nothing");
        assert!(!w.on_acked(77), "unknown seq frees nothing");
        assert_eq!(w.room(), 1);
        assert!(w.on_pushed(10));
    }

    #[test]
    fn never_pushes_twice_or_backwards() {
        let mut w = DeliveryWindow::new(10);
        assert!(w.on_pushed(3));
        assert!(!w.on_pushed(3));
        assert!(!w.on_pushed(2));
        w.on_skipped(8);
        assert_eq!(w.cursor(), 8);
        assert!(!w.on_pushed(7));
        w.on_skipped(4);
        assert_eq!(w.cursor(), 8, "skips never move the cursor back");
    }

    #[test]
    fn queue_empty_announced_once() {
        let mut w = DeliveryWindow::new(1);
        assert!(w.on_drained());
        assert!(!w.on_drained());
    }
}
