-- The event log. Read order is (tx_id, sequence): tx_id is the writing transaction's
-- id, and readers read only below the oldest transaction still in progress, so an
-- event becomes readable only once everything before it in read order has committed.
--
-- Payload and metadata are `json`, kept as the text the producer sent: weir forwards
-- events and never queries inside them, and `jsonb` cost about 30 % of append and 20 %
-- of read throughput in parsing and re-printing. Cast to jsonb to query them in SQL.
CREATE TABLE weir_events (
    sequence        bigint GENERATED ALWAYS AS IDENTITY,
    tx_id           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    id              uuid        NOT NULL,
    category        text        NOT NULL,
    stream          text        NOT NULL,
    position        bigint      NOT NULL,
    name            text        NOT NULL,
    payload         json        NOT NULL,
    metadata        json        NOT NULL,
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
--
-- Rows written now come back with only what the store assigned (the caller has the
-- rest); stored rows returned for idempotency keys come back whole.
--
-- No NOTIFY here: it takes a database-wide lock held through the commit's WAL flush,
-- which would serialise every append. The store notifies after commit instead.
CREATE FUNCTION weir_append(
    p_category         text,
    p_streams          text[],
    p_ids              uuid[],
    p_names            text[],
    p_payloads         json[],
    p_metadata         json[],
    p_occurred_at      timestamptz[],
    p_idempotency_keys text[],
    p_conditions       jsonb
) RETURNS TABLE (
    existing        boolean,
    tx_id           xid8,
    sequence        bigint,
    id              uuid,
    category        text,
    stream          text,
    "position"      bigint,
    name            text,
    payload         json,
    metadata        json,
    occurred_at     timestamptz,
    observed_at     timestamptz,
    idempotency_key text
)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
#variable_conflict use_column
DECLARE
    v_lock     bigint;
    v_existing bigint[] := '{}';
    v_head     record;
    v_accepted jsonb;
    v_streams  text[] := '{}';
    v_last     bigint[] := '{}';
BEGIN
    FOR v_lock IN
        SELECT DISTINCT hashtextextended(p_category || '/' || s, 0) FROM unnest(p_streams) AS s ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(v_lock);
    END LOOP;

    IF cardinality(array_remove(p_idempotency_keys, NULL)) > 0 THEN
        SELECT coalesce(array_agg(k.ord), '{}') INTO v_existing
        FROM unnest(p_idempotency_keys) WITH ORDINALITY AS k(key, ord)
        JOIN weir_events e ON e.category = p_category AND e.idempotency_key = k.key;
    END IF;

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
    INSERT INTO weir_events AS e (id, category, stream, position, name, payload, metadata, occurred_at, idempotency_key)
    SELECT i.id, p_category, i.stream,
           h.last_position + row_number() OVER (PARTITION BY i.stream ORDER BY i.ord),
           i.name, i.payload, i.metadata, i.occurred_at, i.idempotency_key
    FROM unnest(p_streams, p_ids, p_names, p_payloads, p_metadata, p_occurred_at, p_idempotency_keys)
         WITH ORDINALITY AS i(stream, id, name, payload, metadata, occurred_at, idempotency_key, ord)
    JOIN unnest(v_streams, v_last) AS h(stream, last_position) ON h.stream = i.stream
    WHERE i.ord <> ALL (v_existing)
    ORDER BY i.ord
    RETURNING false, e.tx_id, e.sequence, e.id, NULL::text, NULL::text, e.position, NULL::text,
              NULL::json, NULL::json, NULL::timestamptz, e.observed_at, NULL::text;

    IF cardinality(v_existing) > 0 THEN
        RETURN QUERY
        SELECT true, e.tx_id, e.sequence, e.id, e.category, e.stream, e.position, e.name, e.payload,
               e.metadata, e.occurred_at, e.observed_at, e.idempotency_key
        FROM unnest(p_idempotency_keys) WITH ORDINALITY AS k(key, ord)
        JOIN weir_events e ON e.category = p_category AND e.idempotency_key = k.key
        WHERE k.ord = ANY (v_existing);
    END IF;
END;
$$;
