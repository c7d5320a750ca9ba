//! Startup parameters a client sent, turned into settings for its server session.

use crate::proto::startup::Startup;
use crate::server::ServerConn;
use crate::server::Setting;
use postgres_protocol::escape::{escape_identifier, escape_literal};
use std::sync::Arc;

/// Startup keys that are not settings.
const NOT_SETTINGS: [&str; 4] = ["user", "database", "replication", "options"];

/// The settings a client asked for at startup: every parameter that is not user/database,
/// plus the `-c name=value` / `--name=value` switches inside `options`.
pub fn startup_settings(startup: &Startup) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> =
        startup.params.iter().filter(|(k, _)| !NOT_SETTINGS.contains(&k.as_str())).cloned().collect();
    if let Some(options) = startup.param("options") {
        out.extend(parse_options(options));
    }
    out
}

/// Splits a libpq `options` string: whitespace separates switches, backslash escapes the next
/// character. Switches other than `-c` / `--name=value` configure the postmaster and are ignored.
pub fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
                in_word = true;
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next()
        } else if let Some(s) = w.strip_prefix("-c").or_else(|| w.strip_prefix("--")) {
            Some(s.to_string())
        } else {
            tracing::debug!(switch = %w, "ignoring startup option that is not a setting");
            None
        };
        if let Some((name, value)) = setting.as_deref().and_then(|s| s.split_once('=')) {
            // PostgreSQL reads dashes in option names as underscores.
            out.push((name.replace('-', "_"), value.to_string()));
        }
    }
    out
}

/// Reported settings a client may change that follow it from server to server in
/// transaction mode (lowercase), as PgBouncer tracks them.
pub const SYNCED_REPORTED: [&str; 6] =
    ["client_encoding", "datestyle", "intervalstyle", "timezone", "standard_conforming_strings", "application_name"];

/// The settings a client's session should have on whichever server runs its transaction.
#[derive(Debug, Clone, Default)]
pub struct ClientSettings {
    /// Shared with the servers last brought to these settings (copied on write), so a server
    /// handed over between clients with equal settings needs no comparison per transaction.
    items: Arc<Vec<Setting>>,
    /// `track_extra_parameters` (lowercase): unreported settings whose pool defaults every
    /// client starts from.
    extras: Arc<[String]>,
    /// The settings as the client logged in with them: what `RESET` and `DISCARD ALL` return
    /// to, as they would on a server of its own (shared as `items` is at login).
    login: Arc<Vec<Setting>>,
}

/// A pending sync: the statement to run and which settings it sets, in column order.
#[derive(Debug)]
pub struct SyncPlan {
    /// SQL: `RESET`s, then one `SELECT set_config(..)` row.
    pub sql: String,
    /// Keys set by the SELECT, in column order.
    pub set: Vec<String>,
    /// Keys reset.
    pub reset: Vec<String>,
}

/// Distinct settings lists of clients now connected, at most this many.
const INTERNED: usize = 256;

/// The shared copy of a settings list equal to `items`: clients that logged in with the same
/// settings (most of an app's connections) share one list, so the server a client gets from
/// another one is found in sync by a pointer comparison rather than setting by setting.
fn intern(wanted: &[(&str, &str)]) -> Arc<Vec<Setting>> {
    static LISTS: std::sync::Mutex<Vec<std::sync::Weak<Vec<Setting>>>> = std::sync::Mutex::new(Vec::new());
    let same = |l: &Vec<Setting>| {
        l.len() == wanted.len() && l.iter().zip(wanted).all(|(s, (n, v))| s.name == *n && s.value == *v)
    };
    let mut lists = LISTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = lists.iter().filter_map(std::sync::Weak::upgrade).find(|l| same(l)) {
        return found;
    }
    let items = Arc::new(
        wanted
            .iter()
            .map(|(n, v)| Setting { key: n.to_lowercase(), name: n.to_string(), value: v.to_string() })
            .collect::<Vec<_>>(),
    );
    if lists.len() >= INTERNED {
        lists.retain(|l| l.strong_count() > 0);
    }
    if lists.len() < INTERNED {
        lists.push(Arc::downgrade(&items));
    }
    items
}

/// Sets `name` in `wanted` (a later value for the same setting replaces the earlier).
fn put<'a>(wanted: &mut Vec<(&'a str, &'a str)>, name: &'a str, value: &'a str) {
    match wanted.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
        Some(w) => w.1 = value,
        None => wanted.push((name, value)),
    }
}

/// `track_extra_parameters` lowercased, shared by the clients logging in under one config.
fn lowercase_extras(extras: &[String]) -> Arc<[String]> {
    /// The list last asked for, and its lowercase form.
    type Last = Option<(Vec<String>, Arc<[String]>)>;
    static LAST: std::sync::Mutex<Last> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    match &*last {
        Some((from, lower)) if from.as_slice() == extras => lower.clone(),
        _ => {
            let lower: Arc<[String]> = extras.iter().map(|e| e.to_lowercase()).collect();
            *last = Some((extras.to_vec(), lower.clone()));
            lower
        }
    }
}

fn value_in<'a>(list: &'a [(String, String)], key: &str) -> Option<&'a str> {
    list.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.as_str())
}

impl ClientSettings {
    /// Settings from a pool's `defaults` (a fresh server's reported settings and extras),
    /// overlaid with the client's startup settings.
    pub fn new(defaults: &[(String, String)], startup: &[(String, String)], extras: &[String]) -> ClientSettings {
        let mut out = ClientSettings { items: Arc::default(), extras: lowercase_extras(extras), login: Arc::default() };
        // Gathered as references: a client whose settings another one already has (most of
        // them) allocates nothing for them.
        let mut wanted: Vec<(&str, &str)> = Vec::with_capacity(SYNCED_REPORTED.len() + startup.len());
        for key in SYNCED_REPORTED.iter().copied().chain(out.extras.iter().map(String::as_str)) {
            if let Some((name, value)) = defaults.iter().find(|(n, _)| n.eq_ignore_ascii_case(key)) {
                put(&mut wanted, name, value);
            }
        }
        for (name, value) in startup {
            put(&mut wanted, name, value);
        }
        out.items = intern(&wanted);
        out.login = out.items.clone();
        out
    }

    /// True if the client logged in with a setting whose value differs from the pool's
    /// `defaults` (what a fresh server has): a reset would take it to the server's value.
    pub fn has_own_login_values(&self, defaults: &[(String, String)]) -> bool {
        self.login.iter().any(|s| value_in(defaults, &s.key) != Some(s.value.as_str()))
    }

    /// The settings list, shared with the clients that logged in with the same settings.
    pub fn shared(&self) -> &Arc<Vec<Setting>> {
        &self.items
    }

    /// The value the client has for `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.items.iter().find(|s| s.key.eq_ignore_ascii_case(name)).map(|s| s.value.as_str())
    }

    /// Records a ParameterStatus from the client's server: the client changed a setting.
    /// Returns true if it is one the client carries between servers.
    pub fn observe(&mut self, name: &str, value: &str) -> bool {
        match self.items.iter().position(|s| s.key.eq_ignore_ascii_case(name)) {
            Some(i) => {
                if self.items[i].value != value {
                    value.clone_into(&mut Arc::make_mut(&mut self.items)[i].value);
                }
                true
            }
            None => false,
        }
    }

    /// `track_extra_parameters`, lowercase.
    pub fn extras(&self) -> &[String] {
        &self.extras
    }

    /// The statement that makes `server` match this client, if they differ. `defaults` are the
    /// pool's: a setting the server never had applied still has its default.
    pub fn plan_sync(&self, server: &ServerConn, defaults: &[(String, String)]) -> Option<SyncPlan> {
        if server.synced.as_ref().is_some_and(|s| Arc::ptr_eq(s, &self.items) || **s == *self.items) {
            return None;
        }
        let mut set = Vec::new();
        let mut calls = Vec::new();
        for s in self.items.iter() {
            let current = server
                .param_ci(&s.key)
                .or_else(|| value_in(&server.applied, &s.key))
                .or_else(|| value_in(defaults, &s.key));
            if current != Some(s.value.as_str()) {
                calls.push(format!(
                    "pg_catalog.set_config({}, {}, false)",
                    escape_literal(&s.name),
                    escape_literal(&s.value)
                ));
                set.push(s.key.clone());
            }
        }
        // `applied` keys are lowercase, as are `items` keys.
        let reset: Vec<String> = server
            .applied
            .iter()
            .filter(|(k, _)| !self.items.iter().any(|s| s.key == *k))
            .map(|(k, _)| k.clone())
            .collect();
        if set.is_empty() && reset.is_empty() {
            return None;
        }
        // RESETs first: the server may carry another client's statement_timeout, which must
        // not apply to the SELECT that sets this one's.
        let mut sql = String::new();
        for k in &reset {
            sql.push_str(&format!("RESET {};", escape_identifier(k)));
        }
        if !calls.is_empty() {
            sql.push_str(&format!("SELECT {};", calls.join(", ")));
        }
        Some(SyncPlan { sql, set, reset })
    }

    /// Records that `server` now has these settings (`plan_sync` found nothing to do, or the
    /// sync was applied).
    pub fn mark_synced(&self, server: &mut ServerConn) {
        server.synced = Some(self.items.clone());
    }

    /// Takes the canonical values `set_config` returned; records non-reported ones as applied
    /// on the server. Returns the reported settings whose value changed (to tell the client).
    pub fn apply_sync(&mut self, plan: &SyncPlan, row: &[Option<String>], server: &mut ServerConn) -> Vec<Setting> {
        let mut changed = Vec::new();
        for (key, value) in plan.set.iter().zip(row) {
            let Some(value) = value else { continue };
            let reported = server.param_ci(key).is_some();
            if let Some(i) = self.items.iter().position(|s| &s.key == key)
                && &self.items[i].value != value
            {
                let s = &mut Arc::make_mut(&mut self.items)[i];
                value.clone_into(&mut s.value);
                if reported {
                    changed.push(s.clone());
                }
            }
            if !reported {
                server.set_applied(key, value);
            }
        }
        server.applied.retain(|(k, _)| !plan.reset.contains(k));
        changed
    }

    /// Takes what the probe found the session to have set after a transaction (see
    /// `probe`): those are now the client's values. A setting no longer set in the session was
    /// reset (`RESET`, `DISCARD ALL`, a rolled-back `SET`): it goes back to the value the client
    /// logged in with, else to the pool's default, else is dropped (the server's default is what
    /// the client then wants). The server is recorded as holding what the probe found, and as
    /// matching the client only if it does. Returns the reported settings put back to the
    /// client's login value, which the client was last told otherwise.
    pub fn apply_session(
        &mut self,
        session: &[(String, String)],
        server: &mut ServerConn,
        defaults: &[(String, String)],
    ) -> Vec<Setting> {
        let login = self.login.clone();
        let at_login = |key: &str| login.iter().find(|s| s.key == key).map(|s| s.value.as_str());
        let mut restored = Vec::new();
        let items = Arc::make_mut(&mut self.items);
        items.retain_mut(|s| {
            let set = value_in(session, &s.key);
            if let Some(now) = server.param_ci(&s.key) {
                // Reported: the value follows ParameterStatus, except that a reset one returns
                // to the client's login value rather than the server's.
                if let (None, Some(v)) = (set, at_login(&s.key))
                    && now != v
                    && s.value != v
                {
                    v.clone_into(&mut s.value);
                    restored.push(s.clone());
                }
                return true;
            }
            match set.or_else(|| at_login(&s.key)).or_else(|| value_in(defaults, &s.key)) {
                Some(v) => {
                    v.clone_into(&mut s.value);
                    true
                }
                None => false,
            }
        });
        let mut applied = Vec::new();
        for (name, value) in session {
            let key = name.to_lowercase();
            if server.param_ci(&key).is_some() {
                continue;
            }
            if !items.iter().any(|s| s.key == key) {
                items.push(Setting { key: key.clone(), name: name.clone(), value: value.clone() });
            }
            applied.push((key, value.clone()));
        }
        server.applied = applied;
        server.synced = None;
        if self.plan_sync(server, defaults).is_none() {
            self.mark_synced(server);
        }
        restored
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn options_switches_become_settings() {
        assert_eq!(
            parse_options("-c search_path=app,public --statement-timeout=5s -cwork_mem=64MB"),
            pairs(&[("search_path", "app,public"), ("statement_timeout", "5s"), ("work_mem", "64MB")])
        );
    }

    #[test]
    fn backslash_escapes_spaces_in_option_values() {
        assert_eq!(parse_options(r"-c application_name=my\ app"), pairs(&[("application_name", "my app")]));
    }

    #[test]
    fn postmaster_switches_are_ignored() {
        assert_eq!(parse_options("-B 100 -c a=b"), pairs(&[("a", "b")]));
    }

    #[test]
    fn every_parameter_but_user_and_database_is_a_setting() {
        let s = Startup {
            params: pairs(&[
                ("user", "u"),
                ("database", "d"),
                ("application_name", "psql"),
                ("extra_float_digits", "3"),
                ("options", "-c geqo=off"),
            ]),
            ..Startup::default()
        };
        assert_eq!(
            startup_settings(&s),
            pairs(&[("application_name", "psql"), ("extra_float_digits", "3"), ("geqo", "off")])
        );
    }

    fn defaults() -> Vec<(String, String)> {
        pairs(&[("DateStyle", "ISO, MDY"), ("TimeZone", "UTC"), ("server_version", "15.0"), ("search_path", "public")])
    }

    #[test]
    fn client_settings_overlay_startup_values_on_pool_defaults() {
        let c = ClientSettings::new(
            &defaults(),
            &pairs(&[("datestyle", "German"), ("statement_timeout", "5s")]),
            &["search_path".into()],
        );
        assert_eq!(c.get("DateStyle"), Some("German"));
        assert_eq!(c.get("timezone"), Some("UTC"));
        assert_eq!(c.get("statement_timeout"), Some("5s"));
        assert_eq!(c.get("search_path"), Some("public"));
        assert_eq!(c.get("server_version"), None, "not a setting clients carry");
    }

    #[test]
    fn observed_parameter_status_updates_only_carried_settings() {
        let mut c = ClientSettings::new(&defaults(), &[], &[]);
        assert!(c.observe("TimeZone", "Europe/Paris"));
        assert_eq!(c.get("timezone"), Some("Europe/Paris"));
        assert!(!c.observe("is_superuser", "on"));
    }

    #[test]
    fn clients_with_equal_settings_share_one_list_until_one_changes() {
        let startup = pairs(&[("application_name", "interned-test")]);
        let mut a = ClientSettings::new(&defaults(), &startup, &[]);
        let b = ClientSettings::new(&defaults(), &startup, &[]);
        assert!(Arc::ptr_eq(&a.items, &b.items));
        a.observe("TimeZone", "Asia/Tokyo");
        assert!(!Arc::ptr_eq(&a.items, &b.items));
        assert_eq!(b.get("timezone"), Some("UTC"), "the other client keeps its settings");
    }
}
