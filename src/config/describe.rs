//! `pgbroker check`: the effective settings as TOML-like text, secrets redacted.

use super::{Config, ServerMaxConnections};
use std::fmt::Write as _;

impl Config {
    /// The effective settings as TOML-like text, with passwords redacted (`pgbroker check`).
    pub fn describe(&self) -> String {
        let b = &self.broker;
        let mut s = String::new();
        let _ = writeln!(s, "[broker]");
        let _ = writeln!(s, "listen = \"{}\"", b.listen);
        let _ = writeln!(s, "http_listen = \"{}\"", b.http_listen);
        let _ = writeln!(s, "pool_mode = \"{}\"", b.pool_mode.as_str());
        let _ = writeln!(s, "session_state = \"{}\"", b.session_state.as_str());
        if let Some(n) = b.max_pinned_clients {
            let _ = writeln!(s, "max_pinned_clients = {n}");
        }
        let _ = writeln!(s, "max_client_conn = {}", b.max_client_conn);
        match b.default_pool_size {
            Some(n) => {
                let _ = writeln!(s, "default_pool_size = {n}");
            }
            None => {
                let _ = writeln!(s, "# default_pool_size: the budget split across databases");
            }
        }
        let _ = writeln!(s, "server_reset_query = {:?}", b.server_reset_query);
        for (k, d) in [
            ("query_wait_timeout", b.query_wait_timeout),
            ("client_login_timeout", b.client_login_timeout),
            ("server_connect_timeout", b.server_connect_timeout),
            ("server_reset_timeout", b.server_reset_timeout),
            ("reserve_pool_timeout", b.reserve_pool_timeout),
            ("server_lifetime", b.server_lifetime),
            ("server_idle_timeout", b.server_idle_timeout),
            ("server_login_retry", b.server_login_retry),
            ("server_check_delay", b.server_check_delay),
            ("client_idle_timeout", b.client_idle_timeout),
            ("idle_transaction_timeout", b.idle_transaction_timeout),
            ("transaction_timeout", b.transaction_timeout),
            ("shutdown_timeout", b.shutdown_timeout),
            ("query_timeout", b.query_timeout),
            ("http_header_timeout", b.http_header_timeout),
        ] {
            let _ = writeln!(s, "{k} = \"{}ms\"", d.as_millis());
        }
        for (k, n) in [
            ("max_packet_size", b.max_packet_size as u64),
            ("max_buffered_message", b.max_buffered_message as u64),
            ("min_pool_size", b.min_pool_size.into()),
            ("reserve_pool_size", b.reserve_pool_size.into()),
            ("max_db_connections", b.max_db_connections.into()),
            ("max_user_connections", b.max_user_connections.into()),
            ("server_max_uses", b.server_max_uses),
            ("max_client_conn_per_ip", b.max_client_conn_per_ip as u64),
            ("max_prepared_statements", b.max_prepared_statements as u64),
            ("max_client_prepared_statements", b.max_client_prepared_statements as u64),
            ("max_client_prepared_bytes", b.max_client_prepared_bytes as u64),
            ("max_http_connections", b.max_http_connections as u64),
        ] {
            let _ = writeln!(s, "{k} = {n}");
        }
        let _ = writeln!(s, "server_check_query = {:?}", b.server_check_query);
        let _ = writeln!(s, "track_extra_parameters = {:?}", b.track_extra_parameters);
        let _ = writeln!(s, "tcp_keepalive = {}", b.tcp_keepalive);
        let t = &self.tls;
        let _ = writeln!(s, "client_tls_sslmode = \"{}\"", t.client.mode.as_str());
        for (k, f) in [("client_tls_cert_file", &t.client_cert_file), ("client_tls_key_file", &t.client_key_file)] {
            if let Some(f) = f {
                let _ = writeln!(s, "{k} = {:?}", f.display());
            }
        }
        let _ = writeln!(s, "server_tls_sslmode = \"{}\"", t.server.mode.as_str());
        if let Some(f) = &t.server.ca_file {
            let _ = writeln!(s, "server_tls_ca_file = {:?}", f.display());
        }
        let bu = &self.budget;
        let _ = writeln!(s, "\n[budget]");
        match bu.server_max_connections {
            ServerMaxConnections::Auto => {
                let _ = writeln!(s, "server_max_connections = \"auto\"");
            }
            ServerMaxConnections::Fixed(n) => {
                let _ = writeln!(s, "server_max_connections = {n}");
            }
        }
        let _ = writeln!(s, "reserved_connections = {}", bu.reserved_connections);
        let _ = writeln!(s, "max_instances = {}", bu.max_instances);
        let _ = writeln!(s, "mode = \"{}\"", bu.mode.as_str());
        let _ = writeln!(s, "fleet = {:?}", bu.fleet);
        let _ = writeln!(s, "fleet_interval = \"{}ms\"", bu.fleet_interval.as_millis());
        let _ = writeln!(s, "fleet_min_budget = {}", bu.fleet_min_budget);
        if !bu.env_overrides.is_empty() {
            let _ = writeln!(s, "# from the environment: {}", bu.env_overrides.join(", "));
        }
        let w = &self.websocket;
        let _ = writeln!(s, "\n[websocket]\npath = {:?}", w.path);
        for (k, d) in [
            ("ping_interval", w.ping_interval),
            ("pong_timeout", w.pong_timeout),
            ("idle_timeout", w.idle_timeout),
            ("listener_check_interval", w.listener_check_interval),
            ("listener_check_timeout", w.listener_check_timeout),
        ] {
            let _ = writeln!(s, "{k} = \"{}ms\"", d.as_millis());
        }
        let _ = writeln!(s, "max_ws_connections = {}", w.max_ws_connections);
        let _ = writeln!(s, "max_ws_connections_per_ip = {}", w.max_ws_connections_per_ip);
        let _ = writeln!(s, "ws_send_queue = {}", w.ws_send_queue);
        let _ = writeln!(s, "max_channels_per_client = {}", w.max_channels_per_client);
        let _ = writeln!(s, "allowed_origins = {:?}", w.allowed_origins);
        let _ = writeln!(s, "envelope = {:?}", w.envelope.as_str());
        let _ = writeln!(s, "default_channels = {:?}", w.default_channels);
        let _ = writeln!(s, "replay_buffer = {}", w.replay_buffer);
        let _ = writeln!(s, "replay_buffer_bytes = {}", w.replay_buffer_bytes);
        let _ = writeln!(s, "max_payload_bytes = {}", w.max_payload_bytes);
        for (name, c) in &w.channels {
            let _ = writeln!(s, "[websocket.channels.{name:?}]");
            if let Some(k) = &c.kind {
                let _ = writeln!(s, "type = {k:?}");
            }
            if let Some(e) = c.envelope {
                let _ = writeln!(s, "envelope = {:?}", e.as_str());
            }
            if let Some(q) = &c.snapshot_query {
                let _ = writeln!(s, "snapshot_query = {q:?}");
            }
        }
        for t in &w.tokens {
            let _ = writeln!(s, "# token <redacted>: channels {:?}", t.channels);
        }
        let a = &self.auth;
        let _ = writeln!(s, "\n[auth]\ntype = \"{}\"", a.kind.as_str());
        if let Some(f) = &a.file {
            let _ = writeln!(s, "file = {:?}  # {} users", f.display(), a.users.len());
        }
        let _ = writeln!(s, "admin_users = {:?}", a.admin_users);
        let _ = writeln!(s, "stats_users = {:?}", a.stats_users);
        let _ = writeln!(s, "failure_delay = \"{}ms\"", a.throttle.failure_delay.as_millis());
        let _ = writeln!(s, "max_failures_per_ip = {}", a.throttle.max_failures_per_ip);
        let _ = writeln!(s, "max_failures_global = {}", a.throttle.max_failures_global);
        if let Some(q) = &a.query {
            let _ = writeln!(s, "user = {:?}\nquery = {:?}", q.user, q.query);
            if let Some(d) = &q.dbname {
                let _ = writeln!(s, "dbname = {d:?}");
            }
            if q.password.is_some() {
                let _ = writeln!(s, "password = \"<redacted>\"");
            }
        }
        for (name, d) in &self.databases {
            let _ = writeln!(s, "\n[databases.{name}]");
            let _ = writeln!(s, "host = {:?}\nport = {}\ndbname = {:?}", d.host, d.port, d.dbname);
            match &d.user {
                Some(u) => {
                    let _ = writeln!(s, "user = {u:?}");
                }
                None => {
                    let _ = writeln!(s, "# user: the client's own");
                }
            }
            if d.password.is_some() {
                let _ = writeln!(s, "password = \"<redacted>\"");
            }
            match d.pool_size {
                Some(n) => {
                    let _ = writeln!(s, "pool_size = {n}");
                }
                None => {
                    let _ = writeln!(s, "# pool_size: broker default");
                }
            }
            let _ = writeln!(s, "pool_mode = \"{}\"", d.pool_mode.as_str());
            let _ = writeln!(s, "session_state = \"{}\"", d.session_state.as_str());
            if let Some(n) = d.max_pinned_clients {
                let _ = writeln!(s, "max_pinned_clients = {n}");
            }
            let _ = writeln!(
                s,
                "min_pool_size = {}\nreserve_pool_size = {}\nmax_db_connections = {}\nchannels = {:?}",
                d.min_pool_size, d.reserve_pool_size, d.max_db_connections, d.channels
            );
        }
        s
    }
}
