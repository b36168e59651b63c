-- The coordinator term that last set each group's paused state. A term's write is
-- refused once a later term has written: a leader that was paused with an
-- operator's request in its queue must not undo, when it resumes, what the next
-- leader was asked since.
ALTER TABLE weir_groups ADD COLUMN epoch bigint NOT NULL DEFAULT 0;
