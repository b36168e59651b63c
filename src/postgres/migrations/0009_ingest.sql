-- Ingest positions: where each ingest source has got to on its bus, one row per
-- (group, source): the Kafka offset or JetStream stream sequence of the last
-- message appended (or skipped as bad). A row is written only in the transaction
-- that appends the messages up to it, and only while the writer's claim still
-- holds the source's row in weir_checkpoints (locked for that transaction), so
-- the events and the position commit together or not at all, and a fenced owner
-- writes neither.
CREATE TABLE weir_ingest_positions (
    group_name text        NOT NULL,
    source     text        NOT NULL,
    position   bigint      NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (group_name, source)
);
