//! Startup parameters a client sent, turned into settings for its server session.

use crate::proto::startup::Startup;
use postgres_protocol::escape::escape_literal;

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

/// One statement applying `settings` as session defaults. `set_config` takes the value as the
/// string form a startup packet carries, so list settings such as search_path keep their meaning.
pub fn set_config_sql(settings: &[(String, String)]) -> Option<String> {
    if settings.is_empty() {
        return None;
    }
    let calls: Vec<String> = settings
        .iter()
        .map(|(k, v)| format!("pg_catalog.set_config({}, {}, false)", escape_literal(k), escape_literal(v)))
        .collect();
    Some(format!("SELECT {}", calls.join(", ")))
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

    #[test]
    fn set_config_quotes_names_and_values() {
        let sql = set_config_sql(&pairs(&[("application_name", "it's")])).unwrap();
        assert_eq!(sql, "SELECT pg_catalog.set_config('application_name', 'it''s', false)");
        assert_eq!(set_config_sql(&[]), None);
    }
}
