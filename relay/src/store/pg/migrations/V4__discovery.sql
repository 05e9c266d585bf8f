-- Discovery tags, verification sessions and cluster-wide rate buckets (#15, package B2).
-- No phone number, and no hash of one anyone without the OPRF key (kept in files on the
-- nodes) can compute, is ever stored: a tag is a keyed pseudonym of a number. No
-- triggers, no sequences; every table keyed first by what Citus would distribute it by.

-- One account per tag (distributed by tag).
CREATE TABLE discovery_tags (
  tag bytea PRIMARY KEY,
  account bytea NOT NULL,
  filter_key bigint NOT NULL,       -- the u64 filter key, bit for bit
  discoverable bool NOT NULL,
  verified_at bigint NOT NULL       -- Unix ms, start of the UTC day
);
-- One tag per account (distributed by account); tag NULL once the number moved on,
-- while the account's evaluation bucket stays.
CREATE TABLE discovery_accounts (
  account bytea PRIMARY KEY,
  tag bytea,
  bucket_tat bigint
);
-- A number's evaluation bucket, keyed by SHA-256("tern discovery number bucket v1\0" || tag)[..16]
-- as on sled. detached_until: NULL while an account holds the number, 0 once detached
-- and not yet seen by a sweep, else when the sweep removes it.
CREATE TABLE discovery_number_buckets (
  bucket_key bytea PRIMARY KEY,
  tat bigint NOT NULL,
  detached_until bigint
);
CREATE INDEX discovery_number_buckets_detached ON discovery_number_buckets (detached_until)
  WHERE detached_until IS NOT NULL;

-- Open phone verifications, shared by the nodes: the number's tag (evaluated at the
-- start), never the number; code_mac is an HMAC of the session id and the code under
-- a key derived from the OPRF key file.
CREATE TABLE verification_sessions (
  session_id bytea PRIMARY KEY,
  account bytea NOT NULL,
  tag bytea NOT NULL,
  filter_key bigint NOT NULL,
  code_mac bytea NOT NULL,
  attempts_left smallint NOT NULL,
  expires_at bigint NOT NULL        -- Unix ms
);
CREATE INDEX verification_sessions_expiry ON verification_sessions (expires_at);
-- At most one open session per account.
CREATE TABLE verification_by_account (
  account bytea PRIMARY KEY,
  session_id bytea NOT NULL
);

-- GCRA theoretical arrival times (Unix ms) of the limits that hold across nodes:
-- scope 1 address prefix, 2 account, 3 number (keys of 1 and 3 are HMACs, never an
-- address or a number).
CREATE TABLE rate_buckets (
  scope smallint NOT NULL,
  key bytea NOT NULL,
  tat bigint NOT NULL,
  PRIMARY KEY (scope, key)
);
CREATE INDEX rate_buckets_tat ON rate_buckets (tat);
