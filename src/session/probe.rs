//! The look at a server session after a transaction whose statements hinted at session state
//! (see `hints`): every setting the session has set, and the state that keeps the client on
//! this server. Asked of the server rather than parsed from SQL, so a rolled-back `SET`, a
//! `SET LOCAL`, a `pg_try_advisory_lock` that got nothing or a temporary table dropped at
//! commit are seen as what they left behind.

use crate::clients::{PinReason, Pins};
use postgres_protocol::escape::escape_literal;

/// The probe's SELECT. Rows of `(kind, name, value)`: kind `s` for each setting set in the
/// session (with the role and session authorization, which `pg_settings` does not list), kind
/// `p` for each kind of state that cannot move, with how many there are. It runs under the
/// client's settings, whose `search_path` the client chose: every function, operator and type
/// is named with its schema, so none of the client's objects can stand in for them.
macro_rules! probe_select {
    () => {
        "SELECT 's', name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings \
         WHERE source OPERATOR(pg_catalog.=) 'session' \
         UNION ALL SELECT 's', 'role', pg_catalog.current_setting('role') \
         WHERE pg_catalog.current_setting('role') OPERATOR(pg_catalog.<>) 'none' \
         UNION ALL SELECT 's', 'session_authorization', session_user::pg_catalog.text FROM pg_catalog.pg_stat_activity \
         WHERE pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid() AND usename OPERATOR(pg_catalog.<>) session_user \
         UNION ALL SELECT 'p', 'advisory_lock', pg_catalog.count(*)::pg_catalog.text FROM pg_catalog.pg_locks \
         WHERE locktype OPERATOR(pg_catalog.=) 'advisory' AND pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid() \
         UNION ALL SELECT 'p', 'cursor', pg_catalog.count(*)::pg_catalog.text FROM pg_catalog.pg_cursors WHERE is_holdable \
         UNION ALL SELECT 'p', 'temp_table', pg_catalog.count(*)::pg_catalog.text FROM pg_catalog.pg_class \
         WHERE relnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema() \
         UNION ALL SELECT 'p', 'prepare', pg_catalog.count(*)::pg_catalog.text FROM pg_catalog.pg_prepared_statements \
         WHERE from_sql \
         UNION ALL SELECT 'p', 'listen', pg_catalog.count(*)::pg_catalog.text FROM pg_catalog.pg_listening_channels()"
    };
}

/// The probe. `custom` names settings that `pg_settings` may not list (placeholders such
/// as `app.tenant`, found in the client's statements, and `track_extra_parameters`, lowercase):
/// each one it does not list that the session has a value for is reported too. One it lists
/// (`search_path`) is reported only when set in the session, so that one reset is seen as such. `untimed`: for a session whose
/// `statement_timeout` is too short for the probe (a first try was cancelled), the timeout is
/// read first, then lifted for the rest of a transaction; under `SET LOCAL` the session shows
/// the local value, so the one read first replaces it.
pub fn sql(custom: &[String], untimed: bool) -> String {
    let mut select = String::from(probe_select!());
    if !custom.is_empty() {
        let names: Vec<String> = custom.iter().map(|n| escape_literal(n)).collect();
        select.push_str(&format!(
            " UNION ALL SELECT 's', n, pg_catalog.current_setting(n, true) \
             FROM pg_catalog.unnest(ARRAY[{}]::pg_catalog.text[]) n \
             WHERE pg_catalog.current_setting(n, true) OPERATOR(pg_catalog.<>) '' \
             AND pg_catalog.lower(n) OPERATOR(pg_catalog.<>) ALL (SELECT pg_catalog.lower(name) FROM pg_catalog.pg_settings)",
            names.join(", ")
        ));
    }
    if untimed {
        format!(
            "BEGIN; SELECT pg_catalog.current_setting('statement_timeout'); SET LOCAL statement_timeout = 0; {select}; COMMIT"
        )
    } else {
        select
    }
}

/// What the probe found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Probe {
    /// Settings set in the session, by name as the server gives it.
    pub settings: Vec<(String, String)>,
    /// Why the client must keep this server.
    pub pins: Pins,
}

impl Probe {
    /// Reads the rows of `sql`'s query; rows of another shape are skipped.
    pub fn from_rows(rows: &[Vec<Option<String>>]) -> Probe {
        let mut probe = Probe::default();
        // The untimed probe's first row: the session's own statement_timeout.
        let timeout = match rows.first().map(Vec::as_slice) {
            Some([Some(t)]) => Some(t.as_str()),
            _ => None,
        };
        for row in rows {
            let [Some(kind), Some(name), Some(value)] = row.as_slice() else { continue };
            match kind.as_str() {
                "s" if name == "statement_timeout" && timeout.is_some() => {
                    probe.settings.push((name.clone(), timeout.unwrap_or_default().to_string()))
                }
                "s" => probe.settings.push((name.clone(), value.clone())),
                "p" if value != "0" => {
                    if let Some(reason) = PinReason::ALL.into_iter().find(|r| r.as_str() == name) {
                        probe.pins = probe.pins.with(reason);
                    }
                }
                _ => {}
            }
        }
        probe
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: &str, name: &str, value: &str) -> Vec<Option<String>> {
        vec![Some(kind.into()), Some(name.into()), Some(value.into())]
    }

    #[test]
    fn settings_and_pins_are_read_from_the_rows() {
        let probe = Probe::from_rows(&[
            row("s", "statement_timeout", "1ms"),
            row("s", "role", "app_reader"),
            row("p", "advisory_lock", "1"),
            row("p", "cursor", "0"),
            row("p", "temp_table", "3"),
            vec![None, None, None],
        ]);
        assert_eq!(
            probe.settings,
            vec![("statement_timeout".into(), "1ms".into()), ("role".into(), "app_reader".into())]
        );
        assert!(probe.pins.has(PinReason::AdvisoryLock) && probe.pins.has(PinReason::TempTable));
        assert!(!probe.pins.has(PinReason::Cursor));
        assert_eq!(probe.pins.names(), "advisory_lock,temp_table");
    }

    #[test]
    fn the_untimed_probe_reports_the_sessions_own_timeout() {
        let mut rows = vec![vec![Some("1ms".to_string())]];
        rows.push(row("s", "statement_timeout", "0"));
        rows.push(row("s", "work_mem", "8MB"));
        let probe = Probe::from_rows(&rows);
        assert_eq!(probe.settings, vec![("statement_timeout".into(), "1ms".into()), ("work_mem".into(), "8MB".into())]);
    }

    #[test]
    fn nothing_held_is_no_pin() {
        let probe = Probe::from_rows(&[row("p", "advisory_lock", "0"), row("p", "listen", "0")]);
        assert!(probe.pins.is_empty());
        assert_eq!(probe.pins.names(), "");
    }
}
