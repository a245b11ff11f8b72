-- The timeline as chunks: one row per user and fold, listing the ids of that fold's messages the
-- user sent or received, instead of one row per user and message.
--
-- A fold under load brings each busy user a few dozen messages. As rows, each of those was one
-- insert into the (user_id, message_id) B-tree: about two per message, and the largest part of
-- the writer's work (8-10 µs per message in the throughput bench). As chunks, a fold inserts one
-- row per user it touched, whatever the number of messages. A user with little traffic gets
-- chunks of one id, which cost what a row did.
--
-- `ids` is a JSON array of message ids in ascending order. The chunks of one user never overlap
-- (folds take the tail in id order), so walking them by `last_id` descending yields the user's
-- messages newest first, as the old index did.

CREATE TABLE timeline_chunks (
    user_id TEXT NOT NULL,
    -- the newest message id in `ids`
    last_id INTEGER NOT NULL,
    ids     TEXT NOT NULL,
    PRIMARY KEY (user_id, last_id)
) WITHOUT ROWID;

-- Existing rows become chunks of at most 256 ids.
INSERT INTO timeline_chunks (user_id, last_id, ids)
    SELECT user_id, MAX(message_id), json_group_array(message_id ORDER BY message_id)
    FROM (SELECT user_id, message_id,
                 (row_number() OVER (PARTITION BY user_id ORDER BY message_id) - 1) / 256 AS chunk
          FROM timeline)
    GROUP BY user_id, chunk;

DROP TABLE timeline;
