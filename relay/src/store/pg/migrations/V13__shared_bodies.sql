-- Shared bodies (issue 17, package P): a multi-recipient send stores its body once
-- and one `messages` row (an entry) per recipient mailbox that points at it.

-- A body, by a random 16-byte id the relay draws (no sequence), with the number of
-- entries still pointing at it; the entry that takes `refs` to 0 deletes it in its own
-- transaction. Expires with its entries (the same `expires_at`).
CREATE TABLE shared_bodies (
  id bytea PRIMARY KEY CHECK (octet_length(id) = 16),
  payload bytea NOT NULL,
  expires_at bigint NOT NULL,
  refs bigint NOT NULL CHECK (refs >= 0)
);
-- Ciphertext does not compress (as `messages.payload`).
ALTER TABLE shared_bodies ALTER COLUMN payload SET STORAGE EXTERNAL;
ALTER TABLE shared_bodies SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_cost_delay = 0);
CREATE INDEX shared_bodies_expiry ON shared_bodies (expires_at);

-- An entry: `payload` is the device's own part (often empty), `body_id` the body and
-- `body_len` its length (so a deletion counts the mailbox's bytes without reading the
-- body). NULL for a message of its own. NOT VALID: new rows are checked, the existing
-- ones (all NULL) are not scanned under the migration's lock.
ALTER TABLE messages ADD COLUMN body_id bytea, ADD COLUMN body_len bigint;
ALTER TABLE messages ADD CONSTRAINT messages_body
  CHECK ((body_id IS NULL AND body_len IS NULL)
         OR (octet_length(body_id) = 16 AND body_len >= 0)) NOT VALID;
