-- Accounts, devices, delivery tokens, deletion intents and published prekeys (package B1).
-- Every table is keyed first by the account: the distribution column on Citus, the
-- leading primary key column on CockroachDB and YugabyteDB. Ids are bytea of a fixed
-- length, device and key ids are u32 in bigint, days are UTC days since the epoch
-- (NULL: unknown, for records older than days). No triggers, sequences or serials:
-- a new device id is the highest plus one, chosen under the account row's lock.

CREATE TABLE accounts (
    account bytea PRIMARY KEY CHECK (length(account) = 16),
    identity_key bytea NOT NULL CHECK (length(identity_key) = 32),
    created_day bigint CHECK (created_day BETWEEN 0 AND 4294967295)
);

CREATE TABLE devices (
    account bytea NOT NULL CHECK (length(account) = 16),
    device bigint NOT NULL CHECK (device BETWEEN 1 AND 4294967295),
    device_key bytea NOT NULL CHECK (length(device_key) = 32),
    created_day bigint CHECK (created_day BETWEEN 0 AND 4294967295),
    seen_day bigint CHECK (seen_day BETWEEN 0 AND 4294967295),
    PRIMARY KEY (account, device)
);

-- Apart from accounts: a token may be set before (or without) the account record,
-- as in the embedded store; remove_account deletes both in one transaction.
CREATE TABLE delivery_tokens (
    account bytea PRIMARY KEY CHECK (length(account) = 16),
    token_hash bytea NOT NULL CHECK (length(token_hash) = 32)
);

-- An account deletion in progress: finished by the next start if a crash cut it short.
CREATE TABLE account_deletions (
    account bytea PRIMARY KEY CHECK (length(account) = 16),
    devices bigint[] NOT NULL
);

-- Identity agreement key and signed prekey, each id (4) + key (32) + signature (64).
CREATE TABLE device_keys (
    account bytea NOT NULL CHECK (length(account) = 16),
    device bigint NOT NULL CHECK (device BETWEEN 1 AND 4294967295),
    identity_dh bytea CHECK (length(identity_dh) = 100),
    signed_prekey bytea CHECK (length(signed_prekey) = 100),
    PRIMARY KEY (account, device)
);

-- One-time prekeys; a fetch deletes the lowest id (FOR UPDATE SKIP LOCKED).
CREATE TABLE one_time_keys (
    account bytea NOT NULL CHECK (length(account) = 16),
    device bigint NOT NULL CHECK (device BETWEEN 1 AND 4294967295),
    key_id bigint NOT NULL CHECK (key_id BETWEEN 0 AND 4294967295),
    key bytea NOT NULL CHECK (length(key) = 32),
    PRIMARY KEY (account, device, key_id)
);
