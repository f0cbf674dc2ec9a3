-- Groups with access rules (issue: production profile §3). A group is `open` (anyone may join,
-- J-IM's behaviour) or `closed` (members only; joined through the admin API). A group row and a
-- membership row are last-writer-wins between nodes by their version; a removed membership stays
-- as a tombstone (removed = 1) so that the removal replicates. Rows from before this migration
-- keep version 0: any versioned change replaces them.
ALTER TABLE groups ADD COLUMN access TEXT NOT NULL DEFAULT 'open';
ALTER TABLE groups ADD COLUMN updated_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE groups ADD COLUMN updated_by TEXT NOT NULL DEFAULT '';
ALTER TABLE group_members ADD COLUMN removed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE group_members ADD COLUMN changed_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE group_members ADD COLUMN changed_by TEXT NOT NULL DEFAULT '';
