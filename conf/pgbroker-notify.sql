-- pgbroker_notify(channel, payload): pg_notify for payloads of any size up to the bridge's
-- websocket.max_payload_bytes (default 1 MiB), where pg_notify stops at 8000 bytes.
--
-- Install once per database:   psql -d mydb -f /etc/pgbroker/pgbroker-notify.sql
-- Then, in a trigger:          PERFORM pgbroker_notify('employee_changes', row_to_json(NEW)::text);
--
-- The payload goes out as numbered pieces of at most 1,900 characters (under 8000 bytes in
-- any encoding), each prefixed with "pgbroker:1:<xid>:<call>:<i>:<n>:". PostgreSQL delivers
-- the notifications of one transaction together and in order, so pgbroker puts the pieces
-- back together and hands subscribers (WebSocket and SQL LISTEN clients behind it) one
-- notification with the whole payload. A plain LISTEN client not behind pgbroker sees the
-- pieces. The transaction id lets the bridge tell exactly which changes a snapshot saw.
CREATE OR REPLACE FUNCTION pgbroker_notify(channel text, payload text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    piece constant int := 1900;
    total int := greatest(1, ceil(char_length(coalesce(payload, '')) / piece::numeric)::int);
    call text := substr(md5(random()::text || clock_timestamp()::text), 1, 12);
    head text := 'pgbroker:1:' || txid_current() || ':' || call || ':';
BEGIN
    FOR i IN 1..total LOOP
        PERFORM pg_notify(channel, head || i || ':' || total || ':' || substr(coalesce(payload, ''), (i - 1) * piece + 1, piece));
    END LOOP;
END
$$;
