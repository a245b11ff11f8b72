//! The SQLite writer's memory of recent idempotent messages: which message a sender's `msg_id`
//! names, for `MSG_ID_WINDOW`, so that a message sent again after a lost ack is found without
//! touching an index.
//!
//! A `(sender, msg_id)` index written per message cost the writer more than the message itself
//! (`privora-bench throughput --acks`: 10 → 22 µs of the writer thread per message, with the
//! index written per batch; 19–21 µs with it written per fold): keys of a thousand senders land
//! on a thousand pages. Here each key is a 64-bit fingerprint in a hash map, and the table
//! behind it (`sent_msg_ids`, keyed by message id) is only appended to and read back whole when
//! the writer starts. A fingerprint that matches is checked against the message it names, so a
//! collision can only make a message count as new.

use std::collections::VecDeque;

use foldhash::HashMap;

/// Most msg_ids remembered: about 40 bytes each, so at most about 80 MB. A server that takes more
/// idempotent messages a day than this remembers them for less than a day.
pub const MAX_REMEMBERED: usize = 2_000_000;

/// A sender's `msg_id` (as JSON text) as 64 bits: FNV-1a over both, with a separator that
/// neither contains (a user id and a JSON text are UTF-8, and 0xff is never a UTF-8 byte). The
/// same on every build, since the table keeps it across restarts.
pub fn fingerprint(sender: &str, msg_id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in sender.as_bytes().iter().chain([0xffu8].iter()).chain(msg_id.as_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// One remembered msg_id, in the order the messages were stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Remembered {
    pub message_id: i64,
    pub fingerprint: u64,
    /// Unix seconds.
    pub created_at: i64,
}

#[derive(Debug, Default)]
pub struct RecentMsgIds {
    by_fingerprint: HashMap<u64, i64>,
    /// Oldest first (message ids ascending): what expires first.
    order: VecDeque<Remembered>,
}

impl RecentMsgIds {
    /// The message a fingerprint may name (to be checked against that message).
    pub fn get(&self, fingerprint: u64) -> Option<i64> {
        self.by_fingerprint.get(&fingerprint).copied()
    }

    /// Remembers a message just stored (its id above every one remembered).
    pub fn remember(&mut self, entry: Remembered) {
        self.by_fingerprint.insert(entry.fingerprint, entry.message_id);
        self.order.push_back(entry);
    }

    /// Forgets the messages from `message_id` on: their batch was rolled back.
    pub fn forget_from(&mut self, message_id: i64) {
        while self.order.back().is_some_and(|last| last.message_id >= message_id) {
            if let Some(last) = self.order.pop_back() {
                self.unmap(last);
            }
        }
    }

    /// Forgets what was remembered before `since` (Unix seconds), and the oldest beyond
    /// `MAX_REMEMBERED`. Returns the highest message id forgotten, if any: the table's rows up
    /// to it can go.
    pub fn expire(&mut self, since: i64) -> Option<i64> {
        let mut forgotten = None;
        while let Some(&first) = self.order.front() {
            if first.created_at >= since && self.order.len() <= MAX_REMEMBERED {
                break;
            }
            self.order.pop_front();
            self.unmap(first);
            forgotten = Some(first.message_id);
        }
        forgotten
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Drops the fingerprint's mapping unless a later message took it over.
    fn unmap(&mut self, entry: Remembered) {
        if self.by_fingerprint.get(&entry.fingerprint) == Some(&entry.message_id) {
            self.by_fingerprint.remove(&entry.fingerprint);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(message_id: i64, fingerprint: u64, created_at: i64) -> Remembered {
        Remembered { message_id, fingerprint, created_at }
    }

    #[test]
    fn fingerprints_are_fixed_and_keep_sender_and_msg_id_apart() {
        // Computed independently (FNV-1a 64 over sender, 0xff, msg_id): a build that changed
        // them would no longer find the msg_ids a table holds.
        assert_eq!(fingerprint("", ""), 0xaf64_724c_8602_eb6e);
        assert_eq!(fingerprint("alice", "\"c-1\""), 0xe30b_974d_2517_370d);
        assert_ne!(fingerprint("ab", "c"), fingerprint("a", "bc"));
        assert_ne!(fingerprint("a", "\"1\""), fingerprint("a", "1"));
    }

    #[test]
    fn remembers_until_expired_or_rolled_back() {
        let mut recent = RecentMsgIds::default();
        recent.remember(entry(1, 10, 100));
        recent.remember(entry(2, 20, 200));
        recent.remember(entry(3, 30, 300));
        assert_eq!(recent.get(20), Some(2));
        // A rolled-back batch from id 3 on.
        recent.forget_from(3);
        assert_eq!((recent.get(30), recent.len()), (None, 2));
        // Everything created before 200 expires; the highest id forgotten is returned.
        assert_eq!(recent.expire(200), Some(1));
        assert_eq!((recent.get(10), recent.get(20)), (None, Some(2)));
        assert_eq!(recent.expire(200), None);
    }

    #[test]
    fn a_fingerprint_taken_over_by_a_later_message_stays_mapped_to_it() {
        let mut recent = RecentMsgIds::default();
        recent.remember(entry(1, 7, 100));
        recent.remember(entry(2, 7, 500));
        assert_eq!(recent.expire(200), Some(1));
        assert_eq!(recent.get(7), Some(2));
    }
}
