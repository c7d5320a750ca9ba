-- pgbroker fleet mode (budget.mode = "fleet"): the two small tables through which the
-- brokers of a fleet share a server's connections.
--
-- pgbroker creates them on first use when its login may. Otherwise run this file once, as a
-- role that may, in the database the fleet's login connects to (the first [databases.*]
-- entry on that server with a user, or the auth_query user's), then let the login use them:
--
--   psql -d <dbname> -f pgbroker-fleet.sql
--   GRANT SELECT, INSERT, UPDATE, DELETE ON pgbroker_fleet, pgbroker_fleet_round TO <login>;
--
-- Unlogged: the rows are soft state that the brokers rebuild within seconds (after a crash or
-- a failover the tables start empty and every member knocks again); nothing of them is
-- written to the WAL. Half-filled pages keep the heartbeats' updates on the same page.

-- One row per member: the share the last round gave it, what it last said it may hold, and
-- when it last said so.
CREATE UNLOGGED TABLE IF NOT EXISTS pgbroker_fleet (
    fleet text NOT NULL,
    id text NOT NULL,
    share integer NOT NULL DEFAULT 0,
    held integer NOT NULL DEFAULT 0,
    seen timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (fleet, id)
) WITH (fillfactor = 50);

-- One row per fleet: the last round, who ran it, what it saw, and when the next is due.
CREATE UNLOGGED TABLE IF NOT EXISTS pgbroker_fleet_round (
    fleet text PRIMARY KEY,
    ran_at timestamptz NOT NULL,
    next_at timestamptz NOT NULL,
    ran_by text NOT NULL,
    usable integer NOT NULL,
    others integer NOT NULL,
    instances integer NOT NULL,
    fair integer NOT NULL,
    total integer NOT NULL,
    settled boolean NOT NULL
) WITH (fillfactor = 50);
