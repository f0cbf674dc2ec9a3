-- A client id deduplicates within one conversation of one sender (issue: a client that numbers
-- its messages per conversation sent "k1" to bob, then "k1" to carol, and carol's was taken for a
-- duplicate of bob's). The same id in another conversation is another message.
DROP INDEX messages_by_client_id;
CREATE UNIQUE INDEX messages_by_client_id ON messages (sender, conversation, client_id) WHERE client_id IS NOT NULL;
