//! The recipients of the SQLite writer's unfolded tail, kept in memory: a confirmation of a
//! tail message is checked against them instead of by seeking the message's row in `messages`
//! (a B-tree seek and a string compare for every confirmed id, on the writer thread).

use std::collections::VecDeque;
use std::hash::BuildHasher;

/// The recipients of consecutive message ids, as 64-bit hashes: eight bytes a message, and a
/// confirmation hashes its recipient once for all its ids. A hash names a recipient only to
/// check that a confirmed message was sent to the user confirming it; the ids a client
/// confirms are the ones its connection wrote, so a collision could at most let a user confirm
/// a message it was not sent, which it could not have named.
///
/// It only ever covers a run of ids the writer appended itself since the last fold; anything
/// else (a failed batch, ids written by another process) empties it, and confirmations of ids
/// it does not cover are checked in the database as before.
#[derive(Default)]
pub struct TailRecipients {
    /// The id of the first hash.
    from: i64,
    hashes: VecDeque<u64>,
    hasher: foldhash::fast::RandomState,
}

impl TailRecipients {
    pub fn hash(&self, recipient: &str) -> u64 {
        self.hasher.hash_one(recipient)
    }

    /// The next id the writer will append: what is kept must run up to it, or it is dropped.
    pub fn start_batch(&mut self, next_id: i64) {
        if self.end() != next_id {
            self.hashes.clear();
            self.from = next_id;
        }
    }

    /// Message `id` was appended for `recipient` (in the batch being written).
    pub fn push(&mut self, id: i64, recipient: &str) {
        if self.end() != id {
            self.hashes.clear();
            self.from = id;
        }
        let hash = self.hash(recipient);
        self.hashes.push_back(hash);
    }

    /// The messages up to `top` are folded: no longer the tail.
    pub fn folded(&mut self, top: i64) {
        let gone = (top + 1 - self.from).clamp(0, self.hashes.len() as i64);
        self.hashes.drain(..gone as usize);
        self.from += gone;
    }

    /// The batch failed and was rolled back: what it appended was not stored.
    pub fn forget(&mut self) {
        self.hashes.clear();
        self.from = 0;
    }

    /// Whether message `id` went to the recipient hashed as `recipient`; None when not known
    /// here.
    pub fn sent_to(&self, id: i64, recipient: u64) -> Option<bool> {
        let at = usize::try_from(id.checked_sub(self.from)?).ok()?;
        self.hashes.get(at).map(|&hash| hash == recipient)
    }

    fn end(&self) -> i64 {
        self.from + self.hashes.len() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_the_recipients_of_the_ids_appended_since_the_last_fold() {
        let mut tail = TailRecipients::default();
        tail.start_batch(10);
        tail.push(10, "bob");
        tail.push(11, "carol");
        let (bob, carol) = (tail.hash("bob"), tail.hash("carol"));
        assert_eq!(tail.sent_to(10, bob), Some(true));
        assert_eq!(tail.sent_to(10, carol), Some(false));
        assert_eq!(tail.sent_to(11, carol), Some(true));
        assert_eq!(tail.sent_to(9, bob), None);
        assert_eq!(tail.sent_to(12, bob), None);

        tail.folded(10);
        assert_eq!(tail.sent_to(10, bob), None);
        assert_eq!(tail.sent_to(11, carol), Some(true));
        tail.start_batch(12);
        tail.push(12, "bob");
        assert_eq!(tail.sent_to(12, bob), Some(true));
        tail.folded(99);
        assert_eq!(tail.sent_to(12, bob), None);
        tail.start_batch(13);
        tail.push(13, "bob");
        assert_eq!(tail.sent_to(13, bob), Some(true));
    }

    #[test]
    fn forgets_what_it_cannot_vouch_for() {
        let mut tail = TailRecipients::default();
        tail.start_batch(1);
        tail.push(1, "bob");
        let bob = tail.hash("bob");
        // A batch rolled back: ids 1.. may be given again, to other messages.
        tail.forget();
        assert_eq!(tail.sent_to(1, bob), None);
        tail.start_batch(1);
        tail.push(1, "carol");
        assert_eq!(tail.sent_to(1, bob), Some(false));
        // Ids appended elsewhere (the next id is not where this run ends).
        tail.start_batch(5);
        assert_eq!(tail.sent_to(1, bob), None);
        tail.push(5, "bob");
        assert_eq!(tail.sent_to(5, bob), Some(true));
    }
}
