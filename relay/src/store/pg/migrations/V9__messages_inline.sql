-- A message row stays in its heap page up to about 8 KB (most envelopes): no TOAST
-- row and TOAST index entry per message, about 12% less WAL and 15% less database
-- CPU per message than moving every 2 KiB envelope out of line (benches/README.md).
-- Larger payloads still go out of line, uncompressed (STORAGE EXTERNAL, V2).
ALTER TABLE messages SET (toast_tuple_target = 8160);
