-- Queued messages, one mailbox per (account, device). Every table is keyed first by
-- account (a Citus distribution column); no triggers, sequences or serial columns.

-- A mailbox's head: the last seq it handed out and what it holds. Kept when the
-- mailbox empties, so a seq is never handed out twice; its row lock orders the
-- mailbox's appends (seq order = commit order, across nodes).
CREATE TABLE mailbox_heads (
  account bytea NOT NULL CHECK (octet_length(account) = 16),
  device bigint NOT NULL,
  last_seq bigint NOT NULL,
  messages bigint NOT NULL,
  bytes bigint NOT NULL,
  PRIMARY KEY (account, device)
);

CREATE TABLE messages (
  account bytea NOT NULL CHECK (octet_length(account) = 16),
  device bigint NOT NULL,
  seq bigint NOT NULL,
  message_id bytea NOT NULL CHECK (octet_length(message_id) = 16),
  payload bytea NOT NULL,
  accepted_at bigint NOT NULL,
  expires_at bigint NOT NULL,
  PRIMARY KEY (account, device, seq)
);
-- Ciphertext does not compress: kept out of line without a compression attempt.
ALTER TABLE messages ALTER COLUMN payload SET STORAGE EXTERNAL;
-- Acked rows are dead tuples until vacuumed: vacuum early and without pauses.
ALTER TABLE messages SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_cost_delay = 0);
-- The sweep reads what has expired, oldest first (ties in key order), from this index
-- alone: its cost is what has expired.
CREATE INDEX messages_expiry ON messages (expires_at, account, device, seq);

-- Relay-wide totals in 64 slots; each node adds into its own slot (by its name), so
-- nodes rarely wait on one another's row. The totals are the sum over the slots.
CREATE TABLE mailbox_totals (
  slot int PRIMARY KEY,
  messages bigint NOT NULL,
  bytes bigint NOT NULL,
  mailboxes bigint NOT NULL
);
INSERT INTO mailbox_totals SELECT g, 0, 0, 0 FROM generate_series(0, 63) g;
