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
