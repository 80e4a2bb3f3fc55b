-- Revoked tokens (DESIGN §5, POST /v1/users/{user}/disconnect with {"revoke":true}): the
-- user's tokens whose `iat` (seconds since the epoch) is before `revoked_before` are refused.
CREATE TABLE IF NOT EXISTS fanout_revocations (
    user_id        TEXT   NOT NULL PRIMARY KEY,
    revoked_before BIGINT NOT NULL
);
