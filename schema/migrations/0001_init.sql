-- Users, groups, messages and per-(user, conversation) cursors. See DESIGN §5–§6.
CREATE TABLE users (
    user_id       TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    nick          TEXT,
    avatar        TEXT,
    role          TEXT NOT NULL DEFAULT 'user',
    created_at    INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE groups (
    group_id   TEXT PRIMARY KEY,
    name       TEXT,
    avatar     TEXT,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE group_members (
    group_id  TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    joined_at INTEGER NOT NULL,
    PRIMARY KEY (group_id, user_id)
) WITHOUT ROWID;
CREATE INDEX group_members_by_user ON group_members (user_id, group_id);

-- One row per message; (conversation, seq) is the order and the history index.
CREATE TABLE messages (
    conversation TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    id           TEXT NOT NULL,
    client_id    TEXT,
    sender       TEXT NOT NULL,
    recipient    TEXT,
    group_id     TEXT,
    chat_type    INTEGER NOT NULL,
    msg_type     INTEGER NOT NULL,
    content      TEXT NOT NULL,
    extras       TEXT,
    nick         TEXT,
    avatar       TEXT,
    created_at   INTEGER NOT NULL,
    origin       TEXT NOT NULL,
    recalled_at  INTEGER,
    PRIMARY KEY (conversation, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX messages_by_id ON messages (id);
CREATE UNIQUE INDEX messages_by_client_id ON messages (sender, client_id) WHERE client_id IS NOT NULL;
CREATE INDEX messages_by_time ON messages (conversation, created_at);

-- A row per (user, conversation) the user takes part in. `delivered` is the offline cursor:
-- messages with seq > delivered are offline for the user. Both cursors only grow (merge by max).
CREATE TABLE cursors (
    user_id      TEXT NOT NULL,
    conversation TEXT NOT NULL,
    delivered    INTEGER NOT NULL DEFAULT 0,
    read         INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, conversation)
) WITHOUT ROWID;

CREATE TABLE recalls (
    message_id   TEXT PRIMARY KEY,
    conversation TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    recalled_by  TEXT NOT NULL,
    recalled_at  INTEGER NOT NULL
) WITHOUT ROWID;
