-- The msg_ids of idempotent messages (from clients that asked for acks), so that a message sent
-- again after a lost ack is recognised and not stored twice. Only those messages get a row: the
-- original protocol's clients, and messages without a msg_id, cost nothing here.
--
-- `created_at` (Unix seconds) is when the row was written; rows older than the window
-- (store::MSG_ID_WINDOW, a day) are deleted by the writer, oldest first through the index.

CREATE TABLE sent_msg_ids (
    sender     TEXT NOT NULL,
    -- the client's msg_id as JSON text, as in messages.client_msg_id
    msg_id     TEXT NOT NULL,
    message_id BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (sender, msg_id)
);
CREATE INDEX sent_msg_ids_by_age ON sent_msg_ids (created_at);
