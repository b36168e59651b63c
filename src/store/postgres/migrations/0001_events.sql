-- The event log. Read order is (tx_id, sequence): tx_id is the writing transaction's
-- id, and readers read only below the oldest transaction still in progress, so an
-- event becomes readable only once everything before it in read order has committed.
CREATE TABLE weir_events (
    sequence        bigint GENERATED ALWAYS AS IDENTITY,
    tx_id           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    id              uuid        NOT NULL,
    category        text        NOT NULL,
    stream          text        NOT NULL,
    position        bigint      NOT NULL,
    name            text        NOT NULL,
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL,
    occurred_at     timestamptz NOT NULL,
    observed_at     timestamptz NOT NULL DEFAULT now(),
    idempotency_key text,
    CONSTRAINT weir_events_read_order PRIMARY KEY (tx_id, sequence),
    CONSTRAINT weir_events_stream_position UNIQUE (category, stream, position),
    CONSTRAINT weir_events_id UNIQUE (id)
);

CREATE INDEX weir_events_category_read_order ON weir_events (category, tx_id, sequence);

CREATE UNIQUE INDEX weir_events_idempotency ON weir_events (category, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Appends to several streams of one category in one transaction.
--
-- Each stream is serialised by a transaction-level advisory lock taken before the
-- first write. Advisory locks need no transaction id, so the id is assigned only after
-- every lock is held: a later writer to the same stream gets a larger id, and the
-- stream's positions agree with read order. (A row lock would assign the id before
-- waiting, and two writers could commit positions in the opposite order of their ids.)
--
-- Events whose idempotency key the category already holds are returned as stored
-- (existing = true) instead of being written. A stream with something new to write
-- must meet its condition: p_conditions maps a stream to the array of accepted last
-- positions (-1: empty); a stream absent from it accepts anything.
CREATE FUNCTION weir_append(
    p_category        text,
    p_streams         text[],
    p_ids             uuid[],
    p_names           text[],
    p_payloads        jsonb[],
    p_metadata        jsonb[],
    p_occurred_at     timestamptz[],
    p_idempotency_keys text[],
    p_conditions      jsonb
) RETURNS TABLE (
    ord             bigint,
    existing        boolean,
    tx_id           xid8,
    sequence        bigint,
    id              uuid,
    category        text,
    stream          text,
    "position"      bigint,
    name            text,
    payload         jsonb,
    metadata        jsonb,
    occurred_at     timestamptz,
    observed_at     timestamptz,
    idempotency_key text
)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
#variable_conflict use_column
DECLARE
    v_lock       bigint;
    v_existing   bigint[];
    v_head       record;
    v_accepted   jsonb;
    v_streams    text[] := '{}';
    v_last       bigint[] := '{}';
BEGIN
    FOR v_lock IN
        SELECT DISTINCT hashtextextended(p_category || '/' || s, 0) FROM unnest(p_streams) AS s ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(v_lock);
    END LOOP;

    SELECT coalesce(array_agg(k.ord), '{}') INTO v_existing
    FROM unnest(p_idempotency_keys) WITH ORDINALITY AS k(key, ord)
    JOIN weir_events e ON e.category = p_category AND e.idempotency_key = k.key;

    FOR v_head IN
        SELECT s.stream,
               coalesce((SELECT max(e.position) FROM weir_events e
                          WHERE e.category = p_category AND e.stream = s.stream), -1) AS last_position
        FROM (SELECT DISTINCT i.stream
                FROM unnest(p_streams) WITH ORDINALITY AS i(stream, ord)
               WHERE i.ord <> ALL (v_existing)) AS s
    LOOP
        v_accepted := p_conditions -> v_head.stream;
        IF v_accepted IS NOT NULL AND NOT v_accepted @> to_jsonb(v_head.last_position) THEN
            RAISE EXCEPTION 'write condition failed for stream %', v_head.stream
                USING ERRCODE = 'WE001', DETAIL = v_head.stream, HINT = v_head.last_position::text;
        END IF;
        v_streams := v_streams || v_head.stream;
        v_last := v_last || v_head.last_position;
    END LOOP;

    RETURN QUERY
    WITH input AS (
        SELECT i.*
        FROM unnest(p_streams, p_ids, p_names, p_payloads, p_metadata, p_occurred_at, p_idempotency_keys)
             WITH ORDINALITY AS i(stream, id, name, payload, metadata, occurred_at, idempotency_key, ord)
    ),
    fresh AS (
        SELECT i.*, h.last_position + row_number() OVER (PARTITION BY i.stream ORDER BY i.ord) AS position
        FROM input i
        JOIN unnest(v_streams, v_last) AS h(stream, last_position) ON h.stream = i.stream
        WHERE i.ord <> ALL (v_existing)
    ),
    inserted AS (
        INSERT INTO weir_events AS e (id, category, stream, position, name, payload, metadata, occurred_at, idempotency_key)
        SELECT f.id, p_category, f.stream, f.position, f.name, f.payload, f.metadata, f.occurred_at, f.idempotency_key
        FROM fresh f
        ORDER BY f.ord
        RETURNING e.*
    )
    SELECT i.ord, false, x.tx_id, x.sequence, x.id, x.category, x.stream, x.position, x.name, x.payload,
           x.metadata, x.occurred_at, x.observed_at, x.idempotency_key
    FROM inserted x JOIN input i ON i.id = x.id
    UNION ALL
    SELECT i.ord, true, e.tx_id, e.sequence, e.id, e.category, e.stream, e.position, e.name, e.payload,
           e.metadata, e.occurred_at, e.observed_at, e.idempotency_key
    FROM input i JOIN weir_events e ON e.category = p_category AND e.idempotency_key = i.idempotency_key
    WHERE i.ord = ANY (v_existing);

    IF cardinality(v_streams) > 0 THEN
        PERFORM pg_notify(current_schema() || '.appended', p_category);
    END IF;
END;
$$;
