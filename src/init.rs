//! `pgbroker init`: a working setup for the database an app already uses, from its own
//! `DATABASE_URL`. Three files: the config (world-readable, no secret in it), the env file
//! with the server password (0600, read by systemd before it drops privileges) and the auth
//! file with the app's login (0600, handed to the service as a credential). It checks the
//! server before writing anything and prints the URL to give the app.

use crate::budget;
use crate::config::values::{PgUrl, parse_pg_url};
use crate::config::{Config, PoolMode};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The environment variable the config reads the server password from.
const PASSWORD_VAR: &str = "DB_PASSWORD";

/// What `pgbroker init` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// The app's connection URL.
    pub url: String,
    /// Where the config goes; the env and auth files go beside it.
    pub config: PathBuf,
    /// Overwrite existing files.
    pub force: bool,
    /// Instances sharing the server (static budget), if not fleet mode.
    pub instances: Option<u32>,
    /// Fleet name: share the server live with the fleet's other instances.
    pub fleet: Option<String>,
    /// Pool mode.
    pub pool_mode: PoolMode,
    /// The client listener; the HTTP listener takes the next port.
    pub listen: SocketAddr,
}

/// What `init` wrote and found.
#[derive(Debug)]
pub struct Written {
    /// The files, config first.
    pub files: Vec<PathBuf>,
    /// How the budget was derived, one line per server.
    pub budgets: Vec<String>,
    /// The URL to give the app.
    pub app_url: String,
}

/// Why `init` wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The URL does not parse or lacks a part the broker needs.
    #[error("the URL: {0}")]
    Url(String),
    /// A file is there already.
    #[error("{} exists: pass --force to overwrite it", .0.display())]
    Exists(PathBuf),
    /// The written config would not load.
    #[error("the config it would write is invalid: {0}")]
    Config(String),
    /// The server could not be reached or read.
    #[error("cannot reach the server to compute the budget ({0}); nothing was written")]
    Server(String),
    /// Writing a file failed.
    #[error("cannot write {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
}

/// What the package installs in /etc before anyone configures it.
const PACKAGED: [&str; 2] = [include_str!("../conf/pgbroker.toml"), include_str!("../conf/env")];

/// A file as the package installed it (or the empty auth file it creates): `init` may write
/// over it without `--force`, as nobody has configured anything in it yet.
fn is_pristine(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.is_empty() || PACKAGED.iter().any(|p| p.as_bytes() == b.as_slice()))
}

/// The three files' paths for a config at `config`.
fn paths(config: &Path) -> (PathBuf, PathBuf) {
    let dir = config.parent().unwrap_or(Path::new("."));
    (dir.join("env"), dir.join("userlist.txt"))
}

/// Checks the server, then writes the files (none if any step before writing fails).
pub async fn run(opts: &Options) -> Result<Written, InitError> {
    let url = parse_pg_url(&opts.url).map_err(InitError::Url)?;
    let (env_path, auth_path) = paths(&opts.config);
    if !opts.force {
        for p in [&opts.config, &env_path, &auth_path] {
            if p.exists() && !is_pristine(p) {
                return Err(InitError::Exists(p.clone()));
            }
        }
    }
    let text = config_text(&url, opts)?;
    let password = url.password.clone().unwrap_or_default();
    let user = url.user.clone().unwrap_or_default();
    let env_line = format!("{PASSWORD_VAR}={}\n", env_value(&password)?);
    let auth = crate::config::userlist::line(&user, &password);
    // Loaded as the service will load it, its credential in a private directory meanwhile.
    let staged = tempfile::tempdir().map_err(|e| InitError::Write(std::env::temp_dir(), e))?;
    write(&staged.path().join("userlist.txt"), auth.as_bytes(), 0o600)?;
    let cfg = Config::parse(&text, Some(&opts.config), &service_env(&password, staged.path()))
        .map_err(|e| InitError::Config(e.to_string()))?;
    let budgets = budget::derive_all(&cfg).await.map_err(|e| InitError::Server(crate::error::chain(&e)))?;
    write(&opts.config, text.as_bytes(), 0o644)?;
    write(&env_path, env_line.as_bytes(), 0o600)?;
    write(&auth_path, auth.as_bytes(), 0o600)?;
    Ok(Written {
        files: vec![opts.config.clone(), env_path, auth_path],
        budgets: budgets.values().map(ToString::to_string).collect(),
        app_url: app_url(&opts.url, opts.listen),
    })
}

/// The environment the service sees: the env file's password, systemd's credentials.
fn service_env<'a>(password: &'a str, credentials: &'a Path) -> impl Fn(&str) -> Option<String> + 'a {
    move |name: &str| match name {
        PASSWORD_VAR => Some(password.to_string()),
        "CREDENTIALS_DIRECTORY" => Some(credentials.display().to_string()),
        _ => None,
    }
}

/// The config for `url`: one database named as the app names it, the password by reference.
fn config_text(url: &PgUrl, opts: &Options) -> Result<String, InitError> {
    let host = url.host.clone().unwrap_or_else(|| "localhost".into());
    let user = url.user.clone().ok_or_else(|| InitError::Url("it names no user".into()))?;
    let dbname = url.dbname.clone().unwrap_or_else(|| user.clone());
    let http = SocketAddr::new(opts.listen.ip(), opts.listen.port().wrapping_add(1));
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# Written by `pgbroker init` for {}. Every key, with its default: conf/pgbroker.toml.",
        toml_str(&dbname)
    );
    let _ = writeln!(t, "[broker]\nlisten = {}", toml_str(&opts.listen.to_string()));
    let _ = writeln!(t, "# Status page, /metrics, /health and the WebSocket bridge.");
    let _ = writeln!(t, "http_listen = {}", toml_str(&http.to_string()));
    let _ = writeln!(t, "pool_mode = {}", toml_str(opts.pool_mode.as_str()));
    match url.sslmode.as_deref() {
        None => {}
        Some(mode @ ("disable" | "prefer" | "require")) => {
            let _ = writeln!(t, "server_tls_sslmode = {}", toml_str(mode));
        }
        Some("allow") => {
            let _ = writeln!(t, "server_tls_sslmode = \"prefer\"");
        }
        Some(mode @ ("verify-ca" | "verify-full")) => {
            let ca = url
                .sslrootcert
                .as_deref()
                .ok_or_else(|| InitError::Url(format!("sslmode={mode} needs sslrootcert=<CA file> in the URL")))?;
            let _ = writeln!(t, "server_tls_sslmode = {}\nserver_tls_ca_file = {}", toml_str(mode), toml_str(ca));
        }
        Some(other) => return Err(InitError::Url(format!("sslmode={other} is not one PostgreSQL knows"))),
    }
    let _ = writeln!(t, "\n[auth]\n# Clients log in as they did to the server; the file is the service's credential.");
    let _ = writeln!(t, "type = \"scram-sha-256\"\nfile = \"${{CREDENTIALS_DIRECTORY:-.}}/userlist.txt\"");
    let _ = writeln!(t, "\n[budget]\n# Read max_connections and the reservations from the server.");
    let _ = writeln!(t, "server_max_connections = \"auto\"");
    match (&opts.fleet, opts.instances) {
        (Some(fleet), _) => {
            let _ = writeln!(t, "# Shared live with the other instances of the fleet.");
            let _ = writeln!(t, "mode = \"fleet\"\nfleet = {}", toml_str(fleet));
        }
        (None, n) => {
            let _ = writeln!(t, "# App instances sharing the server, each with its own pgbroker.");
            let _ = writeln!(t, "max_instances = {}", n.unwrap_or(1));
        }
    }
    let _ = writeln!(t, "\n[databases.{}]", toml_str(&dbname));
    let _ = writeln!(t, "host = {}", toml_str(&host));
    if let Some(port) = url.port {
        let _ = writeln!(t, "port = {port}");
    }
    let _ = writeln!(t, "dbname = {}\nuser = {}", toml_str(&dbname), toml_str(&user));
    if url.password.is_some() {
        let _ = writeln!(t, "# From the env file beside this one (systemd reads it: EnvironmentFile).");
        let _ = writeln!(t, "password = \"${{{PASSWORD_VAR}}}\"");
    }
    Ok(t)
}

/// The app's URL pointed at the broker: the same login and database, the broker's address,
/// and no TLS options (the broker listens on loopback without TLS).
pub fn app_url(url: &str, listen: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let (main, query) = rest.split_once('?').map_or((rest, None), |(m, q)| (m, Some(q)));
    let (authority, path) = main.split_once('/').map_or((main, None), |(a, p)| (a, Some(p)));
    let userinfo = authority.rsplit_once('@').map(|(u, _)| u);
    let mut out = format!("{scheme}://");
    if let Some(u) = userinfo {
        let _ = write!(out, "{u}@");
    }
    let _ = write!(out, "{listen}");
    if let Some(p) = path {
        let _ = write!(out, "/{p}");
    }
    let kept: Vec<&str> = query
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty() && !kv.starts_with("ssl") && !kv.starts_with("host=") && !kv.starts_with("port="))
        .collect();
    if !kept.is_empty() {
        let _ = write!(out, "?{}", kept.join("&"));
    }
    out
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A value for the env file, read alike by systemd (`EnvironmentFile`) and a shell (`.`):
/// single-quoted, so nothing in it is expanded.
fn env_value(v: &str) -> Result<String, InitError> {
    if v.contains('\'') || v.contains('\n') {
        return Err(InitError::Url(
            "the password holds a ' or a newline, which the env file cannot carry: set DB_PASSWORD yourself".into(),
        ));
    }
    Ok(format!("'{v}'"))
}

/// Writes `bytes` to `path` (creating its directory) with `mode`, the mode set before any
/// byte is written.
fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InitError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e| InitError::Write(path.to_path_buf(), e);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path).map_err(err)?;
    // An existing file keeps its mode through open(): set it.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode)).map_err(err)?;
    f.write_all(bytes).map_err(err)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn opts(url: &str) -> Options {
        Options {
            url: url.into(),
            config: "/nonexistent/pgbroker.toml".into(),
            force: false,
            instances: None,
            fleet: None,
            pool_mode: PoolMode::Transaction,
            listen: "127.0.0.1:6432".parse().unwrap(),
        }
    }

    #[test]
    fn the_app_url_keeps_login_and_database_and_points_at_the_broker() {
        let listen = "127.0.0.1:6432".parse().unwrap();
        assert_eq!(
            app_url("postgres://app:p%40ss@db.internal:5432/orders?sslmode=require&application_name=web", listen),
            "postgres://app:p%40ss@127.0.0.1:6432/orders?application_name=web"
        );
        assert_eq!(app_url("postgresql://db/orders", listen), "postgresql://127.0.0.1:6432/orders");
    }

    #[test]
    fn the_config_holds_no_password_and_maps_sslmode() {
        let u = "postgres://app:s3cret@db.internal:5433/orders?sslmode=require";
        let text = config_text(&parse_pg_url(u).unwrap(), &opts(u)).unwrap();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("password = \"${DB_PASSWORD}\""), "{text}");
        assert!(text.contains("server_tls_sslmode = \"require\""), "{text}");
        assert!(text.contains("[databases.\"orders\"]") && text.contains("port = 5433"), "{text}");
        let creds = tempfile::tempdir().unwrap();
        std::fs::write(creds.path().join("userlist.txt"), "\"app\" \"s3cret\"\n").unwrap();
        let env = service_env("s3cret", creds.path());
        let cfg = Config::parse(&text, Some(Path::new("/etc/pgbroker/pgbroker.toml")), &env).unwrap();
        assert_eq!(cfg.databases["orders"].password.as_deref(), Some("s3cret"));
    }

    #[test]
    fn verify_modes_need_the_ca_file() {
        let u = "postgres://app:x@db/orders?sslmode=verify-full";
        assert!(matches!(config_text(&parse_pg_url(u).unwrap(), &opts(u)), Err(InitError::Url(_))));
    }

    #[test]
    fn secrets_are_quoted_for_their_files() {
        assert_eq!(env_value("a$b\"c").unwrap(), "'a$b\"c'");
        assert!(env_value("it's").is_err());
    }
}
