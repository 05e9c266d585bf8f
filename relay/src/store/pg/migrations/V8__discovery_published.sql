-- The published discovery filter, one copy for every node (#15). The holder of the
-- lease "publish:discovery" writes a day's artefacts in one transaction; every node
-- serves the newest day's, so a client gets the same bytes from any node. Filter
-- keys only: no tag, account id or number. Small and read by every node (a reference
-- table on Citus); no triggers, no sequences.
CREATE TABLE discovery_published (
  day integer NOT NULL,        -- UTC day (days since 1970-01-01) the artefact brings the set to
  kind smallint NOT NULL,      -- 1 snapshot "TDF1", 2 delta "TDD1", 3 sorted key list (u64 LE)
  seq integer NOT NULL,        -- chunk of the artefact, from 0, concatenated in order
  data bytea NOT NULL,
  created_ms bigint NOT NULL,  -- database time of the publication, the same in all its rows
  PRIMARY KEY (day, kind, seq)
);
