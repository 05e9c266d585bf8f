-- Push wake-ups (issue 19): each device's push target. kind 1 is a UnifiedPush
-- endpoint (token empty), kind 2 an app publisher's gateway with the device's token.
CREATE TABLE push_targets (
    account bytea NOT NULL CHECK (length(account) = 16),
    device bigint NOT NULL CHECK (device BETWEEN 1 AND 4294967295),
    kind smallint NOT NULL CHECK (kind IN (1, 2)),
    url text NOT NULL CHECK (length(url) BETWEEN 1 AND 1000),
    token text NOT NULL CHECK (length(token) <= 512),
    PRIMARY KEY (account, device)
);
