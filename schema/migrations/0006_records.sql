-- Records (issue: customer service). The product built on the IM core (inboxes, visitors, agents,
-- conversations, notes, canned replies) keeps its rows here: a kind, an id unique within the kind,
-- a scope to list by (the inbox of a conversation, the conversation of a note), and a JSON body the
-- node's typed model reads. A record is last-writer-wins between nodes by (updated_at, updated_by),
-- like a user row; append-only kinds (notes, activity) are written once and never change.
CREATE TABLE records (
    kind       TEXT NOT NULL,
    id         TEXT NOT NULL,
    scope      TEXT NOT NULL DEFAULT '',
    body       TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    updated_by TEXT NOT NULL,
    rev        INTEGER NOT NULL,
    PRIMARY KEY (kind, id)
) WITHOUT ROWID;
CREATE INDEX records_by_scope ON records (kind, scope);
CREATE INDEX records_by_rev ON records (rev);
