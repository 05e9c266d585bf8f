-- Facts every node must agree on: certificate fingerprint, sender-certificate public key,
-- an OPRF check value (never the key).
CREATE TABLE cluster (name text PRIMARY KEY, value bytea NOT NULL);
-- Jobs one node runs at a time (sweeps, expiry): held until until_ms, database time.
CREATE TABLE leases (name text PRIMARY KEY, holder text NOT NULL, until_ms bigint NOT NULL);
-- The nodes that have started, and when each last said it was alive.
CREATE TABLE nodes (node text PRIMARY KEY, started_ms bigint NOT NULL, heartbeat_ms bigint NOT NULL);
