-- The blob index (package B1; multipart state lives with the object store's package).
-- A blob's row names no account; an account appears only in its charges (one per UTC
-- day on which charged blobs expire) and its unfinished uploads (ARCHITECTURE §11, §14).

-- Keyed (and distributed) by the blob id, the SHA-256 of its encrypted bytes.
CREATE TABLE blobs (
    blob_id bytea PRIMARY KEY CHECK (length(blob_id) = 32),
    size bigint NOT NULL CHECK (size >= 0),
    created_at bigint NOT NULL,
    last_used_at bigint NOT NULL,
    expires_at bigint NOT NULL
);
-- The sweep reads what has expired, soonest first: it costs what has expired.
CREATE INDEX blobs_expiry ON blobs (expires_at, blob_id);

-- Bytes charged to an account, due until the end of UTC day `day`.
CREATE TABLE blob_charges (
    account bytea NOT NULL CHECK (length(account) = 16),
    day bigint NOT NULL CHECK (day >= 0),
    bytes bigint NOT NULL CHECK (bytes >= 0),
    PRIMARY KEY (account, day)
);
CREATE INDEX blob_charges_day ON blob_charges (day);

-- Uploads in progress: what ties an account to a blob until the upload completes.
CREATE TABLE uploads (
    account bytea NOT NULL CHECK (length(account) = 16),
    blob_id bytea NOT NULL CHECK (length(blob_id) = 32),
    size bigint NOT NULL CHECK (size >= 0),
    started_at bigint NOT NULL,
    touched_at bigint NOT NULL,
    PRIMARY KEY (account, blob_id)
);
CREATE INDEX uploads_touched ON uploads (touched_at);
