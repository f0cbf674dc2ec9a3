-- Accounts that change (issue: production profile). A user row is last-writer-wins between nodes:
-- (updated_at, updated_by) is its version, and a change from a peer replaces the row only when
-- its version is newer. token_epoch only grows (merged by max): tokens issued in an earlier epoch
-- are refused. A deleted user stays as a tombstone so that the deletion replicates.
ALTER TABLE users ADD COLUMN banned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN token_epoch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN updated_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN updated_by TEXT NOT NULL DEFAULT '';
