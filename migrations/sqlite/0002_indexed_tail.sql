-- Message indexes are built in sorted batches behind the writer, not per message.
--
-- A per-message insert into a (user, id) index touches one random B-tree page per index, and
-- each page dirtied by a commit is written whole to the WAL: with three such indexes, that (not
-- fsync) bounded the store. Now `messages` is append-only on its rowid, and the newest messages,
-- those with `id > index_state.indexed_upto` (the "tail"), are found by scanning that short tail.
-- The writer folds the tail into `timeline`, `pending` and `contacts` every few thousand messages,
-- sorted by key, so that each B-tree page is written once per fold rather than once per message.
--
-- `delivered` records confirmations of tail messages (appended in about id order: cheap); the
-- fold creates `pending` rows only for tail messages not confirmed by then.

-- Every message a user sent or received, newest found first: the history index.
CREATE TABLE timeline (
    user_id    TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    PRIMARY KEY (user_id, message_id)
) WITHOUT ROWID;

INSERT INTO timeline (user_id, message_id)
    SELECT recipient, id FROM messages
    UNION
    SELECT sender, id FROM messages;

DROP INDEX messages_by_recipient;
DROP INDEX messages_by_sender;

-- Delivery confirmations of messages still in the tail.
CREATE TABLE delivered (
    message_id INTEGER PRIMARY KEY
);

-- How far the fold has come: messages up to `indexed_upto` are in timeline/pending/contacts.
CREATE TABLE index_state (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    indexed_upto INTEGER NOT NULL
);
INSERT INTO index_state (id, indexed_upto) VALUES (1, (SELECT COALESCE(MAX(id), 0) FROM messages));
