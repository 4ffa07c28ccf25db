-- Every record of a session carries a metadata object, as the session row already
-- does: what a chat message carries besides its text (name, usage, ...) and the
-- members of a legacy record that its layout does not know, kept rather than refused.
-- Rows written before this migration have none: '{}'.

ALTER TABLE memshift.messages ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}';
ALTER TABLE memshift.tool_runs ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}';
ALTER TABLE memshift.summaries ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}';
ALTER TABLE memshift.checkpoints ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}';
