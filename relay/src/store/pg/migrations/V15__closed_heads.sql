-- Closed mailbox heads (issue 15). A mailbox's deletion (its purge's last transaction)
-- marks its head closed (Unix ms) instead of deleting the row, and a send's upsert
-- leaves a closed head alone under its lock (`DO UPDATE … WHERE closed_at IS NULL`),
-- so it takes no seq and writes nothing. Why: a send batch that is one statement
-- checks deletion intents with that statement's snapshot, taken before it waits for
-- a head's lock; had the deletion deleted the head, the upsert would insert a new one
-- once the lock came free and the stale check would pass. A closed head stays (its
-- ids never come back: account and device ids are not reused). NULL: open. Adding a
-- nullable column rewrites nothing.
ALTER TABLE mailbox_heads ADD COLUMN closed_at bigint;
