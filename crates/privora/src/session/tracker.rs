//! Which written message frames await a pong, and when the client was last heard. Shared by the
//! reader (pongs arrive there) and the writer (pings go out there).

use std::collections::VecDeque;
use std::time::Instant;

/// Which written message frames await a pong, and when the client was last heard.
pub(super) struct Tracker {
    /// Delivered frames written since the last ping.
    pub(super) unpinged: Vec<i64>,
    /// Pings sent and not yet answered, with the deliveries each confirms.
    pub(super) in_flight: VecDeque<(u64, Vec<i64>)>,
    pub(super) next_seq: u64,
    pub(super) last_heard: Instant,
}

impl Tracker {
    pub(super) fn new() -> Tracker {
        Tracker { unpinged: Vec::new(), in_flight: VecDeque::new(), next_seq: 1, last_heard: Instant::now() }
    }

    /// One ping at a time carries deliveries: pings are coalesced, not one per message.
    pub(super) fn wants_delivery_ping(&self) -> bool {
        !self.unpinged.is_empty() && self.in_flight.is_empty()
    }

    pub(super) fn ping(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.push_back((seq, std::mem::take(&mut self.unpinged)));
        seq
    }

    /// Returns the deliveries the pong confirms, and whether more wait for a ping.
    pub(super) fn pong(&mut self, seq: u64) -> (Vec<i64>, bool) {
        let mut delivered = Vec::new();
        while self.in_flight.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some((_, ids)) = self.in_flight.pop_front() {
                delivered.extend(ids);
            }
        }
        (delivered, !self.unpinged.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pong_confirms_everything_before_its_ping() {
        let mut t = Tracker::new();
        t.unpinged.extend([1, 2]);
        assert!(t.wants_delivery_ping());
        let first = t.ping();
        t.unpinged.push(3);
        assert!(!t.wants_delivery_ping(), "one delivery ping in flight at a time");
        let second = t.ping();
        assert_eq!(t.pong(first), (vec![1, 2], false));
        assert_eq!(t.pong(second), (vec![3], false));
        assert_eq!(t.pong(second), (vec![], false));
    }
}
