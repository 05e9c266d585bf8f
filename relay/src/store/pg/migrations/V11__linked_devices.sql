-- Linked devices (issue 16, package R1). V10 is another change's; refinery applies a
-- gap in order, but a database that applied V11 refuses a V10 added after it
-- (abort_missing), so both ship in one release.

-- The highest device id the account ever had (NULL: only what `devices` shows, for
-- accounts older than this), so a removed id is never handed out again; and the
-- account's signed device list, the exact bytes its identity key signed.
ALTER TABLE accounts
    ADD COLUMN last_device bigint CHECK (last_device BETWEEN 1 AND 4294967295),
    ADD COLUMN device_list_version bigint NOT NULL DEFAULT 0 CHECK (device_list_version >= 0),
    ADD COLUMN device_list bytea CHECK (length(device_list) <= 65536),
    ADD COLUMN device_list_signature bytea CHECK (length(device_list_signature) = 64),
    ADD CONSTRAINT device_list_whole CHECK (
        (device_list IS NULL) = (device_list_signature IS NULL)
        AND (device_list IS NULL) = (device_list_version = 0)
    );

-- A device removal in progress: finished by the next start or sweep if a crash cut
-- it short.
CREATE TABLE device_removals (
    account bytea NOT NULL CHECK (length(account) = 16),
    device bigint NOT NULL CHECK (device BETWEEN 1 AND 4294967295),
    PRIMARY KEY (account, device)
);

-- The idle sweep's scan: linked devices by last-seen day (the primary never expires).
CREATE INDEX devices_idle ON devices (seen_day) WHERE device > 1;

-- Provisioning slots: a new device's sealed link payload, shared by the nodes. At
-- most `max_provisioning_slots` rows (opens are serialised and counted); the account
-- and device only let the deposit be forgotten with the account (P7), and go with
-- the slot. Keyed by the random slot id: nothing here is per account.
CREATE TABLE provisioning_slots (
    slot bytea PRIMARY KEY CHECK (length(slot) = 16),
    reader_hash bytea NOT NULL CHECK (length(reader_hash) = 32),
    expires_at_ms bigint NOT NULL CHECK (expires_at_ms >= 0),
    account bytea CHECK (length(account) = 16),
    device bigint CHECK (device BETWEEN 1 AND 4294967295),
    payload bytea CHECK (length(payload) <= 65536),
    CHECK ((payload IS NULL) = (account IS NULL) AND (account IS NULL) = (device IS NULL))
);

CREATE INDEX provisioning_slots_expiry ON provisioning_slots (expires_at_ms);
