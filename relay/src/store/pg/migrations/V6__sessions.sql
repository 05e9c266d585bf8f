-- Which node holds each connected device's delivery stream: a newer connection on any
-- node displaces the older one. Rows of nodes whose heartbeat stopped are swept.
CREATE TABLE device_sessions (
    account bytea NOT NULL CHECK (octet_length(account) = 16),
    device bigint NOT NULL,
    node text NOT NULL,
    conn bigint NOT NULL,
    since_ms bigint NOT NULL,
    PRIMARY KEY (account, device)
);
CREATE INDEX device_sessions_node ON device_sessions (node);
