-- Leadership leases. One row per lease name; a lease is free once expires_at has
-- passed on the database clock. The epoch grows with every change of hands and is
-- never reused, so it can fence a deposed leader's late writes.
CREATE TABLE weir_leases (
    name       text        PRIMARY KEY,
    holder     text        NOT NULL,
    epoch      bigint      NOT NULL,
    expires_at timestamptz NOT NULL
);

-- The membership registry: one row per subscriber, refreshed by its node's heartbeats.
-- Sources are kept in their canonical text form (`log`, `category:NAME`,
-- `stream:CATEGORY/STREAM`).
CREATE TABLE weir_members (
    group_name   text        NOT NULL,
    subscriber   text        NOT NULL,
    node         text        NOT NULL,
    sources      text[]      NOT NULL,
    tags         text[]      NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    PRIMARY KEY (group_name, subscriber)
);
