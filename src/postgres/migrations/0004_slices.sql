-- Slices, for partitioned sources: every event belongs to one of 1,024 slices, a hash
-- of its stream name, so all events of a stream share one. A partition of a category
-- is a contiguous range of slices.
--
-- The column is generated, so every writer (weir_append, an older weir during an
-- upgrade, a hand-written INSERT) stores it, and adding it computes it for every row
-- already stored. The expression is the slice function of `event::partition`: the top
-- 10 bits of the MD5 digest of the stream name. It must never change.
ALTER TABLE weir_events
    ADD COLUMN slice smallint NOT NULL
    GENERATED ALWAYS AS ((('x' || substr(md5(stream), 1, 4))::bit(16)::integer >> 6)::smallint) STORED;

-- A partition's reader merges one ordered scan per slice of its range, so reading a
-- partition costs in proportion to its own rows, however far behind its reader is.
CREATE INDEX weir_events_category_slice_read_order
    ON weir_events (category, slice, tx_id, sequence);

-- Reads of coarser partitions (fewer than 16 of a category, or of the log): rows in
-- read order from the read-order index, skipping other partitions' rows. In a
-- function so that its plan may use neither a sort nor a full scan: a prepared
-- statement's generic plan cannot know how few rows the slice range keeps, and
-- would otherwise read and sort the whole backlog for every batch.
CREATE FUNCTION weir_read_category_slices(
    p_category text, p_low smallint, p_high smallint, p_tx xid8, p_sequence bigint, p_limit bigint
) RETURNS SETOF weir_events
LANGUAGE sql STABLE
SET search_path FROM CURRENT
SET enable_sort = off
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
    SELECT * FROM weir_events
     WHERE category = p_category AND slice >= p_low AND slice < p_high
       AND (tx_id, sequence) > (p_tx, p_sequence)
       AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
     ORDER BY tx_id, sequence
     LIMIT p_limit
$$;

CREATE FUNCTION weir_read_log_slices(
    p_low smallint, p_high smallint, p_tx xid8, p_sequence bigint, p_limit bigint
) RETURNS SETOF weir_events
LANGUAGE sql STABLE
SET search_path FROM CURRENT
SET enable_sort = off
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
    SELECT * FROM weir_events
     WHERE slice >= p_low AND slice < p_high
       AND (tx_id, sequence) > (p_tx, p_sequence)
       AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
     ORDER BY tx_id, sequence
     LIMIT p_limit
$$;
