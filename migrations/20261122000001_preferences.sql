-- One row per choice a user made; no row means the type's default (DESIGN §4).
CREATE TABLE IF NOT EXISTS fanout_preferences (
    user_id    TEXT      NOT NULL,
    msg_type   TEXT      NOT NULL,
    enabled    BOOLEAN   NOT NULL,
    updated_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (user_id, msg_type)
);
