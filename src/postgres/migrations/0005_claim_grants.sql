-- The allocation decision each checkpoint was last claimed under, as (epoch,
-- revision). A claim made for an older decision than the row's is refused, so that
-- an observer applying a decision the fleet has moved past (a node back from a
-- partition, or one walking the bus's history after a restart) cannot take the
-- row from the owner a newer decision named. Claims made outside any decision (a
-- consumer of a fixed source, a single-node broker) store (0, 0), which every
-- decision's claim beats.
ALTER TABLE weir_checkpoints
    ADD COLUMN claim_epoch    bigint NOT NULL DEFAULT 0,
    ADD COLUMN claim_revision bigint NOT NULL DEFAULT 0;
