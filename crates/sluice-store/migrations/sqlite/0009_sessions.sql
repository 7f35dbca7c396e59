-- Dashboard sign-in sessions (issue #10). The browser holds a random token in
-- an HttpOnly cookie; only its SHA-256 digest is stored here. A session
-- belongs to the key that signed in: every lookup joins api_keys, so revoking
-- the key ends its sessions at once. Times are Unix microseconds; a session
-- is dead once expires_at has passed (expired rows are deleted at the next
-- sign-in).

CREATE TABLE sessions (
    token_hash  BLOB PRIMARY KEY NOT NULL,
    key_id      TEXT NOT NULL REFERENCES api_keys(id),
    csrf_token  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX sessions_expires_at ON sessions (expires_at);
CREATE INDEX sessions_key_id ON sessions (key_id);
