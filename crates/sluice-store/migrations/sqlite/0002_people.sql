-- Users and customers derived from identify / group / alias events (see
-- sluice_core::people). Maintained in the same transaction that indexes the
-- events; rebuilt from the log like the event index. Times are Unix microseconds.

CREATE TABLE users (
    workspace           TEXT NOT NULL,
    user_id             TEXT NOT NULL,
    traits              TEXT NOT NULL,
    customer_id         TEXT,
    customer_linked_at  INTEGER,
    first_seen          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    PRIMARY KEY (workspace, user_id)
);

CREATE TABLE customers (
    workspace    TEXT NOT NULL,
    customer_id  TEXT NOT NULL,
    attributes   TEXT NOT NULL,
    first_seen   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (workspace, customer_id)
);

-- Every customer a user was ever linked to; users.customer_id is the latest.
CREATE TABLE user_customers (
    workspace    TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    customer_id  TEXT NOT NULL,
    linked_at    INTEGER NOT NULL,
    PRIMARY KEY (workspace, user_id, customer_id)
);
CREATE INDEX user_customers_by_customer ON user_customers (workspace, customer_id, user_id);

CREATE TABLE user_aliases (
    workspace    TEXT NOT NULL,
    previous_id  TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    aliased_at   INTEGER NOT NULL,
    PRIMARY KEY (workspace, previous_id)
);
CREATE INDEX user_aliases_by_user ON user_aliases (workspace, user_id);
