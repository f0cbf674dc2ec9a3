-- Webhook deliveries waiting to be made (issue: customer service §5). Local to the node that
-- made the event (never replicated: the event happened once, so it is delivered from one place),
-- kept until the receiver answers 2xx, so a delivery survives a restart and is made at least once.
CREATE TABLE webhook_outbox (
    id         TEXT PRIMARY KEY,
    inbox      TEXT NOT NULL,
    url        TEXT NOT NULL,
    body       TEXT NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_at    INTEGER NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_at);

-- Messages in customer-service conversations (groups `cs-…`) that the node has not yet handled
-- (queue the conversation, reopen it, its webhook): written in the message's own transaction by
-- the node that sequenced it, removed once handled, so a crash between the two only repeats the
-- handling. Local, never replicated.
CREATE TABLE support_pending (
    conversation TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    PRIMARY KEY (conversation, seq)
) WITHOUT ROWID;
