-- The read path a parity result was checked for, so the rollback rule can judge each
-- cutover slice on its own evidence. Live shadow compares know it (the read they
-- sampled); batch `memshift parity` results leave it NULL: they count for every slice.

ALTER TABLE memshift.parity_results ADD COLUMN read_path text;
-- The rule reads, per slice, the newest judged results since the slice last changed.
CREATE INDEX parity_results_read_path_idx ON memshift.parity_results (read_path, checked_at);
