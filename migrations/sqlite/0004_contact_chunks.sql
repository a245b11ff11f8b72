-- Conversation partners as chunks: one row per user and fold, listing the partners that fold
-- saw, merged into one row once a user has more than a few (the writer does that).
--
-- `contacts (user_id, partner_id)` got two random rows per message whose pair was new. When new
-- pairs are common (the throughput bench: 1000 users writing to random peers), each fold then
-- dirtied nearly every page of the table, about 12 MB of WAL per fold of 16,384 messages, and
-- as much again when checkpointed: most of what the store wrote. As chunks, a fold writes one
-- small row per user it touched, and a user's chunks are merged every few folds.
--
-- `partners` is a JSON array of user ids, sorted, each once. A user's partners are the union of
-- their chunks (and of the unfolded tail).

CREATE TABLE contact_chunks (
    user_id  TEXT NOT NULL,
    -- the newest message id the chunk covers (0 for the chunks this migration makes)
    last_id  INTEGER NOT NULL,
    partners TEXT NOT NULL,
    PRIMARY KEY (user_id, last_id)
) WITHOUT ROWID;

INSERT INTO contact_chunks (user_id, last_id, partners)
    SELECT user_id, 0, json_group_array(partner_id ORDER BY partner_id)
    FROM contacts
    GROUP BY user_id;

DROP TABLE contacts;
