//! Settings that take effect only at restart: one list, read by a reload (which keeps the
//! running values) and by SHOW CONFIG (which says they cannot change).

use super::Config;

/// The settings a reload does not change, by their key in the file.
pub const RESTART_ONLY: [&str; 8] = [
    "broker.listen",
    "broker.http_listen",
    "broker.http_header_timeout",
    "broker.max_http_connections",
    "broker.log_format",
    "websocket.path",
    "budget.mode",
    "budget.fleet",
];

impl Config {
    /// Keeps `running`'s values for the restart-only settings; returns the keys whose value
    /// the file changed.
    pub fn keep_restart_only(&mut self, running: &Config) -> Vec<&'static str> {
        RESTART_ONLY.into_iter().filter(|key| self.keep(running, key)).collect()
    }

    /// Restores one restart-only setting; true if the file had changed it.
    fn keep(&mut self, running: &Config, key: &str) -> bool {
        fn keep<T: PartialEq + Clone>(new: &mut T, running: &T) -> bool {
            let changed = new != running;
            new.clone_from(running);
            changed
        }
        let (b, r) = (&mut self.broker, &running.broker);
        match key {
            "broker.listen" => keep(&mut b.listen, &r.listen),
            "broker.http_listen" => keep(&mut b.http_listen, &r.http_listen),
            "broker.http_header_timeout" => keep(&mut b.http_header_timeout, &r.http_header_timeout),
            "broker.max_http_connections" => keep(&mut b.max_http_connections, &r.max_http_connections),
            "broker.log_format" => keep(&mut b.log_format, &r.log_format),
            "websocket.path" => keep(&mut self.websocket.path, &running.websocket.path),
            "budget.mode" => keep(&mut self.budget.mode, &running.budget.mode),
            "budget.fleet" => keep(&mut self.budget.fleet, &running.budget.fleet),
            _ => false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_restart_only_setting_is_kept_by_a_reload() {
        let base = "[auth]\ntype = \"trust\"\n[databases.a]\nuser = \"u\"\npassword = \"p\"\n";
        let running = Config::parse(base, None, &|_| None).unwrap();
        let text = "[broker]\nlisten = \"127.0.0.1:7000\"\nhttp_listen = \"127.0.0.1:7001\"\n\
                    http_header_timeout = \"9s\"\nmax_http_connections = 7\nlog_format = \"json\"\n\
                    [websocket]\npath = \"/other\"\n[budget]\nmode = \"fleet\"\nfleet = \"other\"\n\
                    [auth]\ntype = \"trust\"\n[databases.a]\nuser = \"u\"\npassword = \"p\"\n";
        let mut new = Config::parse(text, None, &|_| None).unwrap();
        assert_eq!(new.keep_restart_only(&running), RESTART_ONLY.to_vec());
        assert_eq!(new.broker.listen, running.broker.listen);
        assert_eq!(new.budget.fleet, running.budget.fleet);
        assert!(new.keep_restart_only(&running).is_empty());
    }
}
