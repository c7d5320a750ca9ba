#![allow(clippy::unwrap_used)]

use super::*;

const ISSUE_EXAMPLE: &str = r#"
[broker]
listen = "127.0.0.1:6432"        # PostgreSQL protocol
http_listen = "127.0.0.1:6433"   # metrics, health, WebSocket bridge (later issues)
pool_mode = "session"            # session | transaction | statement
max_client_conn = 10000

[budget]
server_max_connections = "auto"  # a number, or "auto": read max_connections from the server
reserved_connections = 5         # left free for admins, migrations, other tools
max_instances = 1                # app instances sharing the server

[auth]
type = "scram-sha-256"           # trust | md5 | scram-sha-256
file = "userlist.txt"
admin_users = ["admin"]

[databases.bench]
host = "127.0.0.1"               # or a Unix socket directory
port = 5432
dbname = "bench"                 # defaults to the section name
user = "postgres"                # server login; omitted = the client's own user
password = "postgres"
pool_size = 20
"#;

fn no_env(_: &str) -> Option<String> {
    None
}

/// Writes `text` as pgbroker.toml next to a userlist and parses it.
fn load_with(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("userlist.txt"), "\"postgres\" \"postgres\"\n").unwrap();
    let path = dir.path().join("pgbroker.toml");
    Config::parse(text, Some(&path), env)
}

fn err_text(text: &str) -> String {
    load_with(text, &no_env).unwrap_err().to_string()
}

#[test]
fn the_documented_example_is_accepted_as_written() {
    let c = load_with(ISSUE_EXAMPLE, &no_env).unwrap();
    assert_eq!(c.broker.listen.port(), 6432);
    assert_eq!(c.broker.pool_mode, PoolMode::Session);
    assert_eq!(c.budget.server_max_connections, ServerMaxConnections::Auto);
    assert_eq!(c.auth.kind, AuthType::ScramSha256);
    assert_eq!(c.auth.users.len(), 1);
    let db = &c.databases["bench"];
    assert_eq!((db.port, db.pool_size), (5432, Some(20)));
    assert_eq!(db.user.as_deref(), Some("postgres"));
}

#[test]
fn shipped_config_files_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    for name in ["pgbroker.toml", "pgbroker.minimal.toml"] {
        let c = Config::load(&dir.join(name));
        assert!(c.is_ok(), "{name}: {:?}", c.err());
    }
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let e = err_text("[broker]\nlisten = \"127.0.0.1:1\"\npool_size = 3\n");
    assert!(e.contains("pool_size"), "{e}");
    assert!(e.contains("line 3"), "{e}");
    assert!(e.contains("pgbroker.toml"), "{e}");
}

#[test]
fn bad_values_name_the_key_and_what_was_expected() {
    let e = err_text("[broker]\nquery_wait_timeout = \"soon\"\n");
    assert!(e.contains("broker.query_wait_timeout") && e.contains("30s"), "{e}");
    let e = err_text("[broker]\npool_mode = \"sometimes\"\n");
    assert!(e.contains("broker.pool_mode") && e.contains("transaction"), "{e}");
    let e = err_text("[databases.x]\npool_size = 0\n");
    assert!(e.contains("databases.x.pool_size") && e.contains("at least 1"), "{e}");
    let e = err_text("[broker]\nlisten = \"nowhere\"\n");
    assert!(e.contains("broker.listen"), "{e}");
}

#[test]
fn missing_auth_file_is_an_error_naming_it() {
    let e = err_text("[auth]\nfile = \"nope.txt\"\n");
    assert!(e.contains("auth.file") && e.contains("nope.txt"), "{e}");
}

#[test]
fn durations_accept_units_and_integer_seconds() {
    let c = load_with(
        "[broker]\nquery_wait_timeout = \"250ms\"\nclient_login_timeout = 7\n[auth]\nfile = \"userlist.txt\"\n",
        &no_env,
    )
    .unwrap();
    assert_eq!(c.broker.query_wait_timeout, Duration::from_millis(250));
    assert_eq!(c.broker.client_login_timeout, Duration::from_secs(7));
}

#[test]
fn string_values_expand_environment_variables() {
    let env = |k: &str| (k == "DB_PASSWORD").then(|| "from-env".to_string());
    let c =
        load_with("[auth]\nfile = \"userlist.txt\"\n[databases.app]\npassword = \"${DB_PASSWORD}\"\n", &env).unwrap();
    assert_eq!(c.databases["app"].password.as_deref(), Some("from-env"));
    let e = load_with("[databases.app]\npassword = \"${NOPE}\"\n", &env).unwrap_err();
    assert!(e.to_string().contains("databases.app.password") && e.to_string().contains("NOPE"));
}

#[test]
fn database_url_fills_connection_fields() {
    let c = load_with(
        "[auth]\nfile = \"userlist.txt\"\n[databases.app]\nurl = \"postgres://u:p@10.0.0.9:6000/real\"\n",
        &no_env,
    )
    .unwrap();
    let db = &c.databases["app"];
    assert_eq!((db.host.as_str(), db.port, db.dbname.as_str()), ("10.0.0.9", 6000, "real"));
    assert_eq!((db.user.as_deref(), db.password.as_deref()), (Some("u"), Some("p")));
    let e = err_text("[databases.app]\nurl = \"postgres://h/x\"\nport = 1\n");
    assert!(e.contains("databases.app.url"), "{e}");
}

#[test]
fn database_defaults_follow_the_section_and_broker() {
    let c =
        load_with("[broker]\ndefault_pool_size = 7\n[auth]\nfile = \"userlist.txt\"\n[databases.orders]\n", &no_env)
            .unwrap();
    let db = &c.databases["orders"];
    assert_eq!((db.dbname.as_str(), db.port, db.pool_size), ("orders", 5432, None));
    assert_eq!(c.broker.default_pool_size, Some(7));
    assert_eq!(db.user, None);
}

#[test]
fn environment_overrides_budget_inputs() {
    let env = |k: &str| match k {
        "MAX_INSTANCES" => Some("4".to_string()),
        "DB_MAX_CONNECTIONS" => Some("300".to_string()),
        _ => None,
    };
    let c = load_with(ISSUE_EXAMPLE, &env).unwrap();
    assert_eq!(c.budget.max_instances, 4);
    assert_eq!(c.budget.server_max_connections, ServerMaxConnections::Fixed(300));
    assert_eq!(c.budget.env_overrides, vec!["DB_MAX_CONNECTIONS", "MAX_INSTANCES"]);
    let bad = |k: &str| (k == "MAX_INSTANCES").then(|| "many".to_string());
    assert!(load_with(ISSUE_EXAMPLE, &bad).unwrap_err().to_string().contains("MAX_INSTANCES"));
}

#[test]
fn reserved_connections_must_leave_room() {
    let e = err_text("[budget]\nserver_max_connections = 5\nreserved_connections = 5\n");
    assert!(e.contains("budget.reserved_connections"), "{e}");
}

#[test]
fn describe_redacts_passwords() {
    let c = load_with(ISSUE_EXAMPLE, &no_env).unwrap();
    let d = c.describe();
    assert!(d.contains("[databases.bench]") && d.contains("<redacted>"));
    assert!(!d.contains("password = \"postgres\""));
}

#[test]
fn websocket_tokens_are_read_and_redacted() {
    let text = format!(
        "{ISSUE_EXAMPLE}\n[websocket]\nmax_ws_connections_per_ip = 3\n[[websocket.tokens]]\ntoken = \"tok-1\"\nchannels = [\"orders.*\"]\n"
    );
    let c = load_with(&text, &no_env).unwrap();
    assert_eq!(c.websocket.max_ws_connections_per_ip, 3);
    assert_eq!(c.websocket.tokens[0].channels, vec!["orders.*".to_string()]);
    let d = c.describe();
    assert!(d.contains("[websocket]") && !d.contains("tok-1"), "{d}");
    assert!(format!("{:?}", c.websocket.tokens[0]).contains("<redacted>"));
}

#[test]
fn syntax_errors_do_not_echo_the_offending_line() {
    let e = Config::parse("[databases.x]\npassword = \"hunter2\nport = 1\n", None, &|_| None).unwrap_err().to_string();
    assert!(e.contains("line 2"), "{e}");
    assert!(!e.contains("hunter2"), "a password must not reach the logs: {e}");
}

#[test]
fn type_errors_name_the_key_but_not_the_value() {
    let e = Config::parse("[databases.x]\npassword = 12345678\n", None, &|_| None).unwrap_err().to_string();
    assert!(e.contains("databases.x.password"), "{e}");
    assert!(!e.contains("12345678"), "a password must not reach the logs: {e}");
}

#[test]
fn database_debug_output_redacts_the_password() {
    let c =
        Config::parse("[auth]\ntype = \"trust\"\n[databases.x]\npassword = \"hunter2\"\n", None, &|_| None).unwrap();
    let shown = format!("{c:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[test]
fn password_errors_name_the_key_but_never_the_password() {
    for (line, secret) in [
        ("password = \"hun${ter2\"", "ter2"),
        ("password = \"a${hun ter2}b\"", "ter2"),
        ("url = \"postgres://u:hun%zzter2@127.0.0.1:5432/x\"", "ter2"),
        ("url = \"postgres://u:hun/ter2@127.0.0.1:5432/x\"", "ter2"),
        ("url = \"postgres://u:hunter2@127.0.0.1:5432/x?port=hunter2\"", "ter2"),
        ("url = \"postgres://u:hun%ffter2@127.0.0.1:5432/x\"", "ter2"),
    ] {
        let e = err_text(&format!("[auth]\ntype = \"trust\"\n[databases.x]\n{line}\n"));
        assert!(e.contains("databases.x."), "names the key: {e}");
        assert!(!e.contains(secret), "{line}: the password must not reach logs or replies: {e}");
    }
}

#[test]
fn the_bridge_settings_of_the_issue_are_accepted_as_written() {
    let text = format!(
        "{ISSUE_EXAMPLE}\n{}",
        r#"
[websocket]
envelope = "typed"
default_channels = ["employee_changes"]
replay_buffer = 1000
listener_check_interval = "30s"

[websocket.channels.employee_changes]
type = "employee_update"
envelope = "typed"
snapshot_query = "SELECT coalesce(json_agg(e), '[]') FROM employees e"
"#
    );
    let w = load_with(&text, &no_env).unwrap().websocket;
    assert_eq!(w.envelope, Envelope::Typed);
    assert_eq!(w.default_channels, ["employee_changes"]);
    assert_eq!((w.replay_buffer, w.listener_check_interval), (1000, Duration::from_secs(30)));
    assert_eq!(w.shape("employee_changes"), (Envelope::Typed, "employee_update"));
    assert_eq!(w.shape("other"), (Envelope::Typed, "other"));
}

#[test]
fn bad_bridge_settings_name_their_key() {
    for (toml, key) in [
        ("[websocket]\nenvelope = \"xml\"", "websocket.envelope"),
        ("[websocket]\nping_interval = 0", "websocket.ping_interval"),
        ("[websocket]\nlistener_check_timeout = 0", "websocket.listener_check_timeout"),
        ("[websocket]\ndefault_channels = [\"\"]", "websocket.default_channels"),
        ("[websocket.channels.a]\nenvelope = \"x\"", "websocket.channels.a.envelope"),
    ] {
        let e = err_text(&format!("{ISSUE_EXAMPLE}\n{toml}"));
        assert!(e.contains(key), "{toml}: {e}");
    }
}
