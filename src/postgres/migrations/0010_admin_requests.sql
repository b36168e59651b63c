-- Admin requests by the id their sender gave them (`weir checkpoints reset` sends
-- one), so that a resend of the same id answers with the first outcome instead of
-- running a second time. `status` and `answer` stay NULL while the request runs;
-- `epoch` is the coordinator term that runs it: a row still running under an
-- older term than the leader's was interrupted. Rows are forgotten after a week.
CREATE TABLE weir_admin_requests (
    id          text PRIMARY KEY,
    request     jsonb NOT NULL,
    epoch       bigint NOT NULL,
    node        text NOT NULL,
    status      integer,
    answer      jsonb,
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz
);
CREATE INDEX weir_admin_requests_started ON weir_admin_requests (started_at);

-- A retry of every dead letter of a group pages through them in the order it
-- takes them, by event sequence then id, instead of loading them all.
CREATE INDEX weir_dead_letters_group_order ON weir_dead_letters (group_name, sequence, id);
