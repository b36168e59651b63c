-- Reserved categories: names starting with '$' (weir's lifecycle events in `$weir`)
-- are weir's own. The log and its partitions leave them out, so that a `log`
-- subscription never forwards weir's records of its own work back into that work;
-- they are read as `category:$weir` like any category.
--
-- The log partition reader of migration 4 gets the same filter. It stays a filter on
-- the read-order scan: reserved rows are few, so skipping them costs next to nothing.
CREATE OR REPLACE FUNCTION weir_read_log_slices(
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
       AND category NOT LIKE '$%'
     ORDER BY tx_id, sequence
     LIMIT p_limit
$$;

-- Pruning a reserved category by age (`[lifecycle] retention`) finds its old rows
-- through this index instead of reading the whole category.
CREATE INDEX weir_events_reserved_observed_at
    ON weir_events (category, observed_at)
    WHERE category LIKE '$%';
