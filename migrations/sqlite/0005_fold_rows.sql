-- A fold's rows in fold order.
--
-- Until now a fold wrote each user's new timeline and contacts chunks beside that user's older
-- ones (`timeline_chunks` and `contact_chunks` are keyed by user): a fold of 16,384 messages
-- among 1000 users dirtied about 2,400 pages (10 MB of WAL, and again at the checkpoint) to
-- store about half a megabyte of ids. A fold now appends one row per user it touched at the
-- end of `fold_rows` (keyed by fold first), about its own size in pages. Every few folds the
-- writer moves these rows into the per-user chunks, a slice of users at a time (compaction), so
-- a user's chunk page is written once per several folds instead of once per fold.
--
-- A user's ids in the chunks are always older than their ids in `fold_rows` still waiting to be
-- moved, and rows already moved stay until their whole compaction is done: a reader (and a
-- compaction after a crash) takes from `fold_rows` only the ids newer than the user's newest
-- chunk.

-- The folds whose rows are in `fold_rows`: readers look a user's rows up fold by fold.
CREATE TABLE recent_folds (
    -- the newest message id the fold covers
    fold INTEGER PRIMARY KEY
);

CREATE TABLE fold_rows (
    fold     INTEGER NOT NULL,
    user_id  TEXT NOT NULL,
    -- the ids of the messages the user sent or received in the fold, ascending (a JSON array)
    ids      TEXT NOT NULL,
    -- the user's partners in the fold not known to be recorded before it (a JSON array), or NULL
    partners TEXT,
    PRIMARY KEY (fold, user_id)
) WITHOUT ROWID;
