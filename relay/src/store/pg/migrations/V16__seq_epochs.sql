-- Sequence-number epochs (issue 15). A batch of sends commits without waiting for the
-- WAL flush (its heads are free at once) and is answered after a durability barrier.
-- Committed, it is visible to every node and may be delivered before the flush; a
-- crash or a failover that loses that tail of the WAL would roll `last_seq` back, and
-- the next send would take a seq some recipient already saw (and may ack). So every
-- connection that takes seqs numbers from at least `(epoch - 1) << 40`, where `epoch`
-- is the one in use since the server last lost nothing: `seq_epoch_live`, an unlogged
-- table, is emptied by crash recovery and empty on a promoted standby; a connection
-- that finds it empty takes the next epoch from `seq_epochs` (committed synchronously)
-- and records it there. So every seq handed out after a lost tail is above every seq
-- handed out before, and without a loss seqs stay dense. Epochs stay below 2^23 so
-- that seqs fit a bigint. (Engines without asynchronous commit lose no tail; there the
-- live epoch simply stays.)
CREATE TABLE seq_epochs (
    id int PRIMARY KEY CHECK (id = 0),
    epoch bigint NOT NULL CHECK (epoch >= 0 AND epoch < 8388608)
);
-- A database that took an embedded relay's mailboxes (`admin migrate`) has heads at
-- that store's epoch floor: start at their epoch, so the next epoch lies above them.
INSERT INTO seq_epochs SELECT 0, coalesce(max(last_seq), 0) >> 40 FROM mailbox_heads;
CREATE UNLOGGED TABLE seq_epoch_live (
    id int PRIMARY KEY CHECK (id = 0),
    epoch bigint NOT NULL
);
