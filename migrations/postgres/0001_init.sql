-- Privora's PostgreSQL schema: the same tables as the SQLite one (see migrations/sqlite).
-- `messages` is the history and the truth: a message is never deleted by delivery.
-- `pending` says which messages a recipient has not yet confirmed. With several nodes writing
-- at once, ids are not handed out in commit order, so delivery never relies on "every id above
-- my cursor": a device gets exactly the rows of `pending` for its user.

-- Trigram indexes for substring search on display names. Extensions belong to the whole
-- database, so it goes into `public` whatever schema this migration runs in.
CREATE EXTENSION IF NOT EXISTS pg_trgm WITH SCHEMA public;

CREATE TABLE messages (
    id                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sender              TEXT NOT NULL,
    sender_display_name TEXT NOT NULL,
    recipient           TEXT NOT NULL,
    message             TEXT NOT NULL,
    -- ISO 8601 UTC with milliseconds, e.g. 2026-11-26T09:40:17.123Z (as the protocol writes it)
    timestamp           TEXT NOT NULL,
    -- the client's own msg_id as JSON text (a string or a number), carried through unchanged
    client_msg_id       TEXT
);
CREATE INDEX messages_by_recipient ON messages (recipient, id);
CREATE INDEX messages_by_sender ON messages (sender, id);

CREATE TABLE pending (
    recipient  TEXT NOT NULL,
    message_id BIGINT NOT NULL,
    PRIMARY KEY (recipient, message_id)
);

-- Conversation partners, both directions, kept by the writer as messages are stored.
CREATE TABLE contacts (
    user_id    TEXT NOT NULL,
    partner_id TEXT NOT NULL,
    PRIMARY KEY (user_id, partner_id)
);

-- The user directory: every user who logged in (and, with Firebase, every synced user).
CREATE TABLE users (
    user_id      TEXT PRIMARY KEY,
    display_name TEXT,
    email        TEXT,
    updated_at   TEXT NOT NULL
);

-- Case-insensitive substring search (ILIKE '%q%') on display names without a scan.
CREATE INDEX users_display_name_trgm ON users USING gin (display_name public.gin_trgm_ops);
