-- Checkpoints: how far each group's consumer of a source has got, one row per
-- (group, source). Sources are kept in their canonical text form, as in weir_members.
--
-- The claim token fences out earlier owners: claiming a row writes a fresh token, and
-- a save changes the row only if it presents the token of the latest claim. A consumer
-- that lost its source without noticing is refused instead of moving the new owner's
-- cursor. owner is kept beside the token so that the refusal can name who holds it.
--
-- The cursor is (tx_id, sequence) as in weir_events. tx_id is bigint rather than
-- xid8: it is only stored and handed back, never compared with a live transaction id,
-- and a plain integer is what operators can read and edit. weir writes neither half
-- above 2^63 - 1 and refuses to read a negative one back.
CREATE TABLE weir_checkpoints (
    group_name text        NOT NULL,
    source     text        NOT NULL,
    owner      text        NOT NULL,
    claim      uuid        NOT NULL,
    tx_id      bigint      NOT NULL,
    sequence   bigint      NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (group_name, source)
);

-- Dead letters: events a consumer skipped under the `Continue` policy, kept with the
-- error that made it give up, for operators (`weir dead-letters list`) to inspect and
-- replay by hand. Rows are only ever inserted.
--
-- ids come from a sequence: increasing in the order rows are inserted, but a letter
-- may commit after one with a higher id. That is fine for an operator paging through
-- the list; nothing consumes dead letters by id.
CREATE TABLE weir_dead_letters (
    id          bigserial   PRIMARY KEY,
    group_name  text        NOT NULL,
    source      text        NOT NULL,
    event_id    uuid        NOT NULL,
    sequence    bigint      NOT NULL,
    kind        text        NOT NULL,
    error       text        NOT NULL,
    attempts    integer     NOT NULL,
    recorded_at timestamptz NOT NULL
);

-- Listing one group's letters after an id, oldest first, reads this index in order;
-- listing every group's uses the primary key.
CREATE INDEX weir_dead_letters_group_id ON weir_dead_letters (group_name, id);
