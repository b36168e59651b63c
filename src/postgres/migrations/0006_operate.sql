-- What operators set and what nodes report, for steering the fleet without SQL.
-- Paused groups: a paused group's owners keep their sources but read nothing; the
-- row outlives restarts and changes of leader.
CREATE TABLE weir_groups (
    group_name text        PRIMARY KEY,
    paused     boolean     NOT NULL,
    changed_at timestamptz NOT NULL
);

-- Each node's newest report of itself (role, readiness, admin address, consumers),
-- for `weir status --fleet` from any node.
CREATE TABLE weir_nodes (
    node        text        PRIMARY KEY,
    report      jsonb       NOT NULL,
    reported_at timestamptz NOT NULL
);
