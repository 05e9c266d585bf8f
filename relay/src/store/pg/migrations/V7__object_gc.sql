-- Blobs whose records were deleted and whose objects may still be stored: remove_blob
-- inserts here in the same transaction as the deletion; the sweeper deletes the object,
-- then the row. A crash between the two leaves the row, and the next sweep deletes the
-- object again (a deletion of an absent object succeeds).
CREATE TABLE object_gc (
    blob_id bytea PRIMARY KEY CHECK (octet_length(blob_id) = 32),
    queued_ms bigint NOT NULL
);
CREATE INDEX object_gc_queued ON object_gc (queued_ms);
