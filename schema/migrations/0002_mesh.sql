-- The mesh (DESIGN §7). Every row a node writes carries the node's next revision, so a peer can
-- ask for "everything written here after revision N" after a restart, a partition or when it
-- joins with an empty database. Rows that each node derives for itself keep revision 0.
ALTER TABLE users ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
ALTER TABLE groups ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
ALTER TABLE group_members ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
ALTER TABLE cursors ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
ALTER TABLE recalls ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;

-- Rows written before this migration get distinct revisions, in a stable order, so that they
-- replicate like any other.
CREATE TEMP TABLE rev_seed (t TEXT NOT NULL, a, b);
INSERT INTO rev_seed (t, a, b) SELECT 'users', user_id, '' FROM users;
INSERT INTO rev_seed (t, a, b) SELECT 'groups', group_id, '' FROM groups;
INSERT INTO rev_seed (t, a, b) SELECT 'group_members', group_id, user_id FROM group_members;
INSERT INTO rev_seed (t, a, b) SELECT 'messages', conversation, seq FROM messages ORDER BY created_at, conversation, seq;
INSERT INTO rev_seed (t, a, b) SELECT 'cursors', user_id, conversation FROM cursors;
INSERT INTO rev_seed (t, a, b) SELECT 'recalls', message_id, '' FROM recalls;
CREATE INDEX temp.rev_seed_key ON rev_seed (t, a, b);
UPDATE users SET rev = (SELECT rowid FROM rev_seed WHERE t = 'users' AND a = users.user_id AND b = '');
UPDATE groups SET rev = (SELECT rowid FROM rev_seed WHERE t = 'groups' AND a = groups.group_id AND b = '');
UPDATE group_members SET rev = (SELECT rowid FROM rev_seed WHERE t = 'group_members' AND a = group_members.group_id AND b = group_members.user_id);
UPDATE messages SET rev = (SELECT rowid FROM rev_seed WHERE t = 'messages' AND a = messages.conversation AND b = messages.seq);
UPDATE cursors SET rev = (SELECT rowid FROM rev_seed WHERE t = 'cursors' AND a = cursors.user_id AND b = cursors.conversation);
UPDATE recalls SET rev = (SELECT rowid FROM rev_seed WHERE t = 'recalls' AND a = recalls.message_id AND b = '');
DROP TABLE rev_seed;

CREATE INDEX users_by_rev ON users (rev);
CREATE INDEX groups_by_rev ON groups (rev);
CREATE INDEX group_members_by_rev ON group_members (rev);
CREATE INDEX messages_by_rev ON messages (rev);
CREATE INDEX cursors_by_rev ON cursors (rev);
CREATE INDEX recalls_by_rev ON recalls (rev);

-- How far this node has applied each peer's change stream.
CREATE TABLE mesh_peers (
    peer       TEXT PRIMARY KEY,
    applied    INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
