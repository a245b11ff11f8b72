-- The msg_ids of idempotent messages (from clients that asked for acks), so that a message sent
-- again after a lost ack is recognised and not stored twice. Only those messages get a row: the
-- original protocol's clients, and messages without a msg_id, cost nothing here.
--
-- The writer keeps them in memory (store/msg_ids.rs) as 64-bit fingerprints of (sender,
-- msg_id) and checks a match against the message it names; this table is appended to, one row
-- per idempotent message at the end of the table, and read back whole when the writer starts.
-- A (sender, msg_id) index here cost more than storing the message itself: keys of many
-- senders land on as many pages.
--
-- `created_at` (Unix seconds) is when the message was stored; rows older than the window
-- (store::MSG_ID_WINDOW, a day) are deleted by the writer, oldest first.

CREATE TABLE sent_msg_ids (
    message_id  INTEGER PRIMARY KEY,
    fingerprint INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);
