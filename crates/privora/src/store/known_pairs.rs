//! The conversation pairs the SQLite writer knows to be recorded in `contact_chunks`, so that a
//! fold writes a user's partners only when some are new.
//!
//! Most messages go to someone the sender has written to before; without this, every fold wrote
//! a row for every user it touched, and each row dirties a page of its own (a quarter of the
//! WAL's pages under the throughput bench; with ten partners per user, a fifth of all the pages
//! the store wrote). Only committed pairs are added, so forgetting is always safe: a pair
//! recorded twice is listed once.

use foldhash::HashMap;

/// Most pairs remembered (four bytes each: 8 to 16 MB with the lists' spare room); past that
/// all are forgotten, and the next folds record again the pairs they meet. A thousand users who
/// all write to each other make about a million: they fit. When they did not (a hash set of
/// 524,288 pairs), the set filled up and was forgotten every sixteen folds or so; each fold then
/// wrote every pair it met as new, and compaction merged the chunks that made again and again
/// (callgrind over messages 2.0-2.5 million of `store_workload 1000 2500000 1000 25`: 30.0k
/// instructions a message on the writer thread then, 20.8k now).
pub const KNOWN_PAIRS: usize = 1 << 21;

/// Users are numbered as they come, and each user's partners kept as a sorted list of numbers.
#[derive(Default)]
pub struct KnownPairs {
    numbers: HashMap<String, u32>,
    /// By user number: the partners' numbers, ascending.
    partners: Vec<Vec<u32>>,
    /// Pairs in `partners`.
    len: usize,
}

impl KnownPairs {
    /// The user's number, given on first sight.
    pub fn number(&mut self, user: &str) -> u32 {
        if let Some(&n) = self.numbers.get(user) {
            return n;
        }
        let n = self.partners.len() as u32;
        self.numbers.insert(user.to_string(), n);
        self.partners.push(Vec::new());
        n
    }

    pub fn contains(&self, user: u32, partner: u32) -> bool {
        self.partners.get(user as usize).is_some_and(|list| list.binary_search(&partner).is_ok())
    }

    /// Remembers `user` and `partner` (numbers given by `number`) as recorded.
    pub fn insert(&mut self, user: u32, partner: u32) {
        let Some(list) = self.partners.get_mut(user as usize) else { return };
        if let Err(at) = list.binary_search(&partner) {
            list.insert(at, partner);
            self.len += 1;
        }
    }

    /// Forgets everything once more than `KNOWN_PAIRS` pairs or `max_users` users are known.
    pub fn trim(&mut self, max_users: usize) {
        if self.len > KNOWN_PAIRS || self.numbers.len() > max_users {
            *self = KnownPairs::default();
        }
    }

    #[cfg(test)]
    fn count(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_known_one_way_once_inserted() {
        let mut known = KnownPairs::default();
        let (a, b, c) = (known.number("a"), known.number("b"), known.number("c"));
        assert_eq!(known.number("b"), b);
        known.insert(a, c);
        known.insert(a, b);
        known.insert(a, c);
        assert!(known.contains(a, b) && known.contains(a, c));
        assert!(!known.contains(b, a) && !known.contains(c, c));
        assert_eq!(known.count(), 2);
    }

    #[test]
    fn past_the_bound_everything_is_forgotten() {
        let mut known = KnownPairs::default();
        let users: Vec<u32> = (0..4).map(|u| known.number(&format!("u{u}"))).collect();
        known.insert(users[0], users[1]);
        known.trim(4);
        assert!(known.contains(users[0], users[1]));
        known.number("u4");
        known.trim(4);
        assert_eq!(known.count(), 0);
        assert!(!known.contains(users[0], users[1]));
        // Numbers start over too: the first user seen again gets 0.
        assert_eq!(known.number("u3"), 0);
    }
}
