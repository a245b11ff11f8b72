-- Privora's SQLite schema.
-- `messages` is the history and the truth: a message is never deleted by delivery.
-- `pending` says which messages a recipient has not yet confirmed; a row goes when the message
-- is confirmed delivered to one of the recipient's connections.

CREATE TABLE messages (
    id                  INTEGER PRIMARY KEY,
    sender              TEXT NOT NULL,
    sender_display_name TEXT NOT NULL,
    recipient           TEXT NOT NULL,
    message             TEXT NOT NULL,
    -- ISO 8601 UTC with milliseconds, e.g. 2026-11-26T09:40:17.123Z
    timestamp           TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    -- the client's own msg_id as JSON text (a string or a number), carried through unchanged
    client_msg_id       TEXT
);
CREATE INDEX messages_by_recipient ON messages (recipient, id);
CREATE INDEX messages_by_sender ON messages (sender, id);

CREATE TABLE pending (
    recipient  TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    PRIMARY KEY (recipient, message_id)
) WITHOUT ROWID;

-- Conversation partners, both directions, kept by the writer as messages are stored.
CREATE TABLE contacts (
    user_id    TEXT NOT NULL,
    partner_id TEXT NOT NULL,
    PRIMARY KEY (user_id, partner_id)
) WITHOUT ROWID;

-- The user directory: every user who logged in (and, with Firebase, every synced user).
CREATE TABLE users (
    user_id      TEXT PRIMARY KEY NOT NULL,
    display_name TEXT,
    email        TEXT,
    updated_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- Substring search on display names (case-insensitive) without a scan: a trigram index.
CREATE VIRTUAL TABLE users_search USING fts5 (
    display_name, content = 'users', content_rowid = 'rowid', tokenize = 'trigram'
);
CREATE TRIGGER users_search_insert AFTER INSERT ON users BEGIN
    INSERT INTO users_search (rowid, display_name) VALUES (new.rowid, new.display_name);
END;
CREATE TRIGGER users_search_delete AFTER DELETE ON users BEGIN
    INSERT INTO users_search (users_search, rowid, display_name)
    VALUES ('delete', old.rowid, old.display_name);
END;
CREATE TRIGGER users_search_update AFTER UPDATE OF display_name ON users BEGIN
    INSERT INTO users_search (users_search, rowid, display_name)
    VALUES ('delete', old.rowid, old.display_name);
    INSERT INTO users_search (rowid, display_name) VALUES (new.rowid, new.display_name);
END;
