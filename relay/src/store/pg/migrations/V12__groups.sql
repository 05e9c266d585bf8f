-- Groups on MLS (issue 17, package W): key packages per device, and each group
-- handle's epoch. V13 is another package's.

-- One-time MLS key packages; a fetch deletes the lowest id (FOR UPDATE SKIP LOCKED).
-- Ids are given per device in publish order (under the device's advisory lock).
CREATE TABLE key_packages (
    account bytea NOT NULL CHECK (length(account) = 16),
    device bigint NOT NULL CHECK (device BETWEEN 1 AND 4294967295),
    id bigint NOT NULL CHECK (id >= 0),
    package bytea NOT NULL CHECK (length(package) BETWEEN 1 AND 4096),
    PRIMARY KEY (account, device, id)
);

-- Each device's last-resort key package, handed out (and kept) when the pool is
-- empty or the device's rate is spent.
CREATE TABLE last_resort_key_packages (
    account bytea NOT NULL CHECK (length(account) = 16),
    device bigint NOT NULL CHECK (device BETWEEN 1 AND 4294967295),
    package bytea NOT NULL CHECK (length(package) BETWEEN 1 AND 4096),
    PRIMARY KEY (account, device)
);

-- A group handle (16 random bytes, linked to no account) and all the relay keeps
-- about its group: the epoch, the hash of the epoch token, the commit id that made
-- the epoch, and the UTC day of the last change (the idle sweep's index).
CREATE TABLE group_epochs (
    handle bytea PRIMARY KEY CHECK (length(handle) = 16),
    epoch bigint NOT NULL CHECK (epoch >= 0),
    token_hash bytea NOT NULL CHECK (length(token_hash) = 32),
    last_commit_id bytea NOT NULL CHECK (length(last_commit_id) = 16),
    touched_day bigint NOT NULL CHECK (touched_day BETWEEN 0 AND 4294967295)
);

CREATE INDEX group_epochs_idle ON group_epochs (touched_day);
