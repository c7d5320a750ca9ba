//! Parsers for config values: durations with units, `${ENV}` expansion, `postgres://` URLs.

use std::time::Duration;

/// Parses `"250ms"`, `"30s"`, `"15m"`, `"1h"`, `"2d"` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("expected a duration such as \"30s\", got {s:?}"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        other => {
            return Err(format!("unknown duration unit {other:?} in {s:?} (use ms, s, m, h or d)"));
        }
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| format!("duration {s:?} is out of range"))
}

/// Replaces every `${NAME}` in `s` with the value `env` gives for NAME, and `${NAME:-default}`
/// with it or, when NAME is unset or empty, `default` (as the shell does).
pub fn expand_env(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        // Errors never quote the value: it may be a password that happens to hold `${`.
        let end = after
            .find('}')
            .ok_or("an unterminated ${ (a password with \"${\" in it can be given through an environment variable)")?;
        let (name, default) = match after[..end].split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (&after[..end], None),
        };
        let value = match (env(name).filter(|v| !v.is_empty() || default.is_none()), default) {
            (Some(v), _) => v,
            (None, Some(d)) => d.to_string(),
            (None, None) if is_env_name(name) => return Err(format!("environment variable {name} is not set")),
            (None, None) => return Err("a ${...} that names no environment variable".into()),
        };
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The parts of a `postgres://user:password@host:port/dbname` URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgUrl {
    /// Host name, IP address, or Unix socket directory (from `?host=` or a percent-encoded path).
    pub host: Option<String>,
    /// Port.
    pub port: Option<u16>,
    /// Database name.
    pub dbname: Option<String>,
    /// User.
    pub user: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// `sslmode`, as the client asked for it.
    pub sslmode: Option<String>,
    /// `sslrootcert`: the CA file to verify the server with.
    pub sslrootcert: Option<String>,
}

/// A URL's port that is not a number: often a password with `/`, `@` or `:` left unescaped.
const BAD_PORT: &str =
    "the port is not a number (in a URL, write '/', '@', ':' and '%' in a password as %2F, %40, %3A and %25)";

/// Parses a libpq-style connection URL (single host). Errors never quote the URL: it holds
/// a password.
pub fn parse_pg_url(url: &str) -> Result<PgUrl, String> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or("URL must start with postgres:// or postgresql://")?;
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = main.split_once('/').unwrap_or((main, ""));
    let mut out = PgUrl::default();
    let hostport = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            out.user = non_empty(percent_decode(user)?);
            out.password = password.map(percent_decode).transpose()?;
            hostport
        }
        None => authority,
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("unterminated [ in host")?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (percent_decode(h)?, Some(p)),
            None => (percent_decode(hostport)?, None),
        }
    };
    out.host = non_empty(host);
    if let Some(p) = port.filter(|p| !p.is_empty()) {
        out.port = Some(p.parse().map_err(|_| BAD_PORT)?);
    }
    out.dbname = non_empty(percent_decode(path)?);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v)?;
        match k {
            "host" => out.host = non_empty(v),
            "port" => out.port = Some(v.parse().map_err(|_| BAD_PORT)?),
            "dbname" => out.dbname = non_empty(v),
            "user" => out.user = non_empty(v),
            "password" => out.password = Some(v),
            "sslmode" => out.sslmode = non_empty(v),
            "sslrootcert" => out.sslrootcert = non_empty(v),
            // Client-side options (sslmode, application_name, ...) do not apply to the broker's
            // own server connections yet; accept them rather than fail a copied DATABASE_URL.
            _ => {}
        }
    }
    Ok(out)
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn percent_decode(s: &str) -> Result<String, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex: String =
                [bytes.next(), bytes.next()].into_iter().map(|c| c.map(char::from).unwrap_or('?')).collect();
            let v = u8::from_str_radix(&hex, 16).map_err(|_| "a bad %-escape (write a literal % as %25)")?;
            out.push(v);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).map_err(|_| "a %-escaped part that is not UTF-8".to_string())
}

/// True for a name the shell would take as a variable: `[A-Za-z_][A-Za-z0-9_]*`.
fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_or_bare_seconds() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("12").unwrap(), Duration::from_secs(12));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 fortnights").is_err());
    }

    #[test]
    fn env_references_are_expanded() {
        let env = |k: &str| (k == "PW").then(|| "s3cret".to_string());
        assert_eq!(expand_env("a-${PW}-b", &env).unwrap(), "a-s3cret-b");
        assert_eq!(expand_env("no refs $ here", &env).unwrap(), "no refs $ here");
        assert!(expand_env("${MISSING}", &env).unwrap_err().contains("MISSING"));
        assert!(expand_env("${PW", &env).is_err());
        assert_eq!(expand_env("${MISSING:-/etc/x}/f", &env).unwrap(), "/etc/x/f");
        assert_eq!(expand_env("${PW:-other}", &env).unwrap(), "s3cret");
    }

    #[test]
    fn urls_give_host_port_db_and_credentials() {
        let u = parse_pg_url("postgres://app:p%40ss@db.internal:6543/orders?sslmode=disable").unwrap();
        assert_eq!(u.user.as_deref(), Some("app"));
        assert_eq!(u.password.as_deref(), Some("p@ss"));
        assert_eq!(u.host.as_deref(), Some("db.internal"));
        assert_eq!(u.port, Some(6543));
        assert_eq!(u.dbname.as_deref(), Some("orders"));
    }

    #[test]
    fn urls_accept_socket_directories_and_ipv6() {
        let u = parse_pg_url("postgresql://%2Fvar%2Frun%2Fpostgresql/db").unwrap();
        assert_eq!(u.host.as_deref(), Some("/var/run/postgresql"));
        let u = parse_pg_url("postgres://[::1]:5433/db").unwrap();
        assert_eq!(u.host.as_deref(), Some("::1"));
        assert_eq!(u.port, Some(5433));
        let u = parse_pg_url("postgres:///db?host=/tmp").unwrap();
        assert_eq!(u.host.as_deref(), Some("/tmp"));
        assert!(parse_pg_url("mysql://x").is_err());
        assert!(parse_pg_url("postgres://h:notaport/db").is_err());
    }
}
