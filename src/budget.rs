//! The per-instance server connection budget: `floor((server max_connections - reserved) /
//! instances)`, and how it was derived. One budget per upstream server; every connection the
//! broker opens to that server counts against it.

use crate::config::{BudgetMode, Config, Database, ServerMaxConnections};
use crate::server::{Credential, ServerConn, ServerError, Target};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use thiserror::Error;

/// What a server says about its own connection limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerLimits {
    /// `max_connections`.
    pub max_connections: u32,
    /// `superuser_reserved_connections`.
    pub superuser_reserved: u32,
    /// `reserved_connections` (PostgreSQL 16+; 0 before).
    pub server_reserved: u32,
}

/// Where `max_connections` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `budget.server_max_connections` in the config file.
    Config,
    /// The `DB_MAX_CONNECTIONS` environment variable.
    Env,
    /// Read from the server (`"auto"`).
    Server,
}

/// A budget and every input of it, for `pgbroker check`, the log and `SHOW BUDGET`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derivation {
    /// The server this budget is for (`host:port` or socket path).
    pub server: String,
    /// Its `max_connections`.
    pub max_connections: u32,
    /// Where that came from.
    pub source: Source,
    /// Server-side reserved slots subtracted (only with `auto`).
    pub superuser_reserved: u32,
    /// PostgreSQL 16+ `reserved_connections` subtracted (only with `auto`).
    pub server_reserved: u32,
    /// `budget.reserved_connections`.
    pub reserved: u32,
    /// `budget.max_instances` (or `MAX_INSTANCES`).
    pub instances: u32,
    /// Whether `instances` came from the environment.
    pub instances_from_env: bool,
    /// The result: most server connections this instance may hold to `server` (in fleet
    /// mode: what the whole fleet may hold, shared live).
    pub budget: u32,
    /// Fleet mode: `instances` is not used, the fleet shares `budget`.
    pub fleet: bool,
}

impl fmt::Display for Derivation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let src = match self.source {
            Source::Config => "config",
            Source::Env => "DB_MAX_CONNECTIONS",
            Source::Server => "server",
        };
        write!(
            f,
            "{} {} for {} = {}(max_connections {} [{src}]",
            if self.fleet { "fleet connections" } else { "budget" },
            self.budget,
            self.server,
            if self.fleet { "" } else { "floor(" },
            self.max_connections
        )?;
        if self.source == Source::Server {
            write!(
                f,
                " - superuser_reserved_connections {} - server reserved_connections {}",
                self.superuser_reserved, self.server_reserved
            )?;
        }
        if self.fleet {
            return write!(f, " - reserved_connections {}), shared live by the fleet", self.reserved);
        }
        let inst = if self.instances_from_env { "MAX_INSTANCES" } else { "config" };
        write!(f, " - reserved_connections {}) / max_instances {} [{inst}])", self.reserved, self.instances)
    }
}

/// Why no budget could be derived; the broker does not start.
#[derive(Debug, Error)]
pub enum BudgetError {
    /// The arithmetic leaves less than one connection.
    #[error("{0}: the budget is below 1; lower budget.reserved_connections or max_instances, or raise max_connections")]
    BelowOne(Derivation),
    /// `auto` needs a login to read the server's settings.
    #[error(
        "budget.server_max_connections = \"auto\" needs a database on {server} with user and password (or auth.user) to read max_connections; set server_max_connections or DB_MAX_CONNECTIONS instead"
    )]
    NoCredentials {
        /// The server.
        server: String,
    },
    /// Fleet mode heartbeats and counts the fleet over a login of the broker's own.
    #[error(
        "budget.mode = \"fleet\" needs a database on {server} with user and password (or auth.user) to count the fleet in pg_stat_activity"
    )]
    FleetNoLogin {
        /// The server.
        server: String,
    },
    /// Reading the server's settings failed.
    #[error("cannot read max_connections from {server} for budget.server_max_connections = \"auto\"")]
    Read {
        /// The server.
        server: String,
        /// Cause.
        #[source]
        source: ServerError,
    },
}

/// Pure arithmetic of the budget.
pub fn compute(
    server: &str,
    cfg: &crate::config::Budget,
    limits: Option<ServerLimits>,
) -> Result<Derivation, BudgetError> {
    let (max_connections, source, superuser_reserved, server_reserved) = match (cfg.server_max_connections, limits) {
        (ServerMaxConnections::Fixed(n), _) => {
            let src = if cfg.env_overrides.contains(&"DB_MAX_CONNECTIONS") { Source::Env } else { Source::Config };
            (n, src, 0, 0)
        }
        (ServerMaxConnections::Auto, Some(l)) => {
            (l.max_connections, Source::Server, l.superuser_reserved, l.server_reserved)
        }
        (ServerMaxConnections::Auto, None) => (0, Source::Server, 0, 0),
    };
    let usable = i64::from(max_connections)
        - i64::from(superuser_reserved)
        - i64::from(server_reserved)
        - i64::from(cfg.reserved_connections);
    let fleet = cfg.mode == BudgetMode::Fleet;
    let instances = if fleet { 1 } else { cfg.max_instances.max(1) };
    let budget = (usable.max(0) / i64::from(instances)) as u32;
    let d = Derivation {
        server: server.to_string(),
        max_connections,
        source,
        superuser_reserved,
        server_reserved,
        reserved: cfg.reserved_connections,
        instances: cfg.max_instances,
        instances_from_env: cfg.env_overrides.contains(&"MAX_INSTANCES"),
        budget,
        fleet,
    };
    if budget < 1 {
        return Err(BudgetError::BelowOne(d));
    }
    Ok(d)
}

/// What a whole fleet may hold on a server with `limits`: the budget of one instance alone
/// (0 when nothing is left). A fixed `server_max_connections` above what the server itself
/// allows gives way to the server's figure: every round reads it, and more would only end in
/// "too many clients".
pub fn usable(cfg: &crate::config::Budget, limits: ServerLimits) -> u32 {
    let alone = crate::config::Budget { mode: BudgetMode::Fleet, ..cfg.clone() };
    let configured = compute("", &alone, Some(limits)).map_or(0, |d| d.budget);
    if limits.max_connections == 0 {
        return configured;
    }
    let server = crate::config::Budget { server_max_connections: ServerMaxConnections::Auto, ..alone };
    configured.min(compute("", &server, Some(limits)).map_or(0, |d| d.budget))
}

/// The upstream server a database lives on; databases on one server share its budget.
pub fn server_of(db: &Database) -> String {
    if db.host.starts_with('/') {
        format!("{}/.s.PGSQL.{}", db.host, db.port)
    } else {
        format!("{}:{}", db.host, db.port)
    }
}

/// Reads a server's connection limits over a fresh login.
pub async fn read_server_limits(target: Arc<Target>, cfg: &Config) -> Result<ServerLimits, ServerError> {
    let mut conn = ServerConn::connect(target, cfg.broker.server_connect_timeout).await?;
    let row = conn
        .query_row(
            "SELECT current_setting('max_connections'), current_setting('superuser_reserved_connections'), \
             current_setting('reserved_connections', true)",
        )
        .await?
        .map_err(|e| ServerError::Refused { code: e.code, message: e.message })?;
    let num = |i: usize| -> u32 { row.get(i).and_then(|v| v.as_deref()).and_then(|v| v.parse().ok()).unwrap_or(0) };
    Ok(ServerLimits { max_connections: num(0), superuser_reserved: num(1), server_reserved: num(2) })
}

/// Derives the budget of every server the config names, reading the servers for `auto`.
pub async fn derive_all(cfg: &Config) -> Result<BTreeMap<String, Derivation>, BudgetError> {
    let mut out = BTreeMap::new();
    for db in cfg.databases.values() {
        let server = server_of(db);
        if out.contains_key(&server) {
            continue;
        }
        if cfg.budget.mode == BudgetMode::Fleet && login_for(cfg, &server).is_none() {
            return Err(BudgetError::FleetNoLogin { server });
        }
        let limits = match cfg.budget.server_max_connections {
            ServerMaxConnections::Fixed(_) => None,
            ServerMaxConnections::Auto => {
                let target =
                    login_for(cfg, &server).ok_or_else(|| BudgetError::NoCredentials { server: server.clone() })?;
                Some(
                    read_server_limits(Arc::new(target), cfg)
                        .await
                        .map_err(|source| BudgetError::Read { server: server.clone(), source })?,
                )
            }
        };
        out.insert(server.clone(), compute(&server, &cfg.budget, limits)?);
    }
    Ok(out)
}

/// The login the broker uses on `server` for its own work (reading its settings, fleet
/// mode): a database's own user (the first such database), else the `auth_query` user.
/// Returns the database's config name, the user and the password.
pub(crate) fn own_login(cfg: &Config, server: &str) -> Option<(String, String, Option<String>)> {
    let on_server = || cfg.databases.iter().filter(|(_, db)| server_of(db) == server);
    on_server().find_map(|(name, db)| Some((name.clone(), db.user.clone()?, db.password.clone()))).or_else(|| {
        let aq = cfg.auth.query.as_ref()?;
        let password = aq.password.clone().or_else(|| cfg.auth.users.get(&aq.user)?.password().map(str::to_owned));
        Some((on_server().next()?.0.clone(), aq.user.clone(), password))
    })
}

/// A configured login for `server`, used to read its settings ([`own_login`]).
pub(crate) fn login_for(cfg: &Config, server: &str) -> Option<Target> {
    let (name, user, password) = own_login(cfg, server)?;
    let db = cfg.databases.get(&name)?;
    Some(Target {
        host: db.host.clone(),
        port: db.port,
        dbname: db.dbname.clone(),
        user,
        credential: password.map(Credential::Password),
        keepalive: cfg.broker.tcp_keepalive,
        tls: cfg.tls.server.clone(),
        application_name: None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn inputs(
        max: ServerMaxConnections,
        reserved: u32,
        instances: u32,
        env: Vec<&'static str>,
    ) -> crate::config::Budget {
        crate::config::Budget {
            server_max_connections: max,
            reserved_connections: reserved,
            max_instances: instances,
            env_overrides: env,
            mode: crate::config::BudgetMode::Static,
            fleet: "default".into(),
            fleet_interval: std::time::Duration::from_secs(5),
            fleet_min_budget: 2,
        }
    }

    #[test]
    fn a_fleet_never_counts_on_more_than_the_server_allows() {
        let limits = ServerLimits { max_connections: 60, superuser_reserved: 3, server_reserved: 0 };
        let above = inputs(ServerMaxConnections::Fixed(100), 5, 1, vec![]);
        assert_eq!(usable(&above, limits), 60 - 3 - 5, "the server's own figure wins");
        let below = inputs(ServerMaxConnections::Fixed(30), 5, 1, vec![]);
        assert_eq!(usable(&below, limits), 30 - 5, "a lower configured figure is kept");
    }

    #[test]
    fn auto_subtracts_the_servers_own_reservations() {
        let limits = ServerLimits { max_connections: 40, superuser_reserved: 3, server_reserved: 0 };
        let d = compute("db:5432", &inputs(ServerMaxConnections::Auto, 10, 3, vec![]), Some(limits)).unwrap();
        assert_eq!(d.budget, 9, "floor((40 - 3 - 10) / 3)");
        assert_eq!(d.source, Source::Server);
        let text = d.to_string();
        assert!(text.contains("superuser_reserved_connections 3") && text.contains("max_instances 3"), "{text}");
    }

    #[test]
    fn fixed_max_connections_is_used_as_given() {
        let d = compute("db:5432", &inputs(ServerMaxConnections::Fixed(100), 5, 4, vec![]), None).unwrap();
        assert_eq!(d.budget, 23, "floor((100 - 5) / 4)");
        assert_eq!(d.source, Source::Config);
    }

    #[test]
    fn environment_overrides_are_named_in_the_derivation() {
        let d = compute(
            "db:5432",
            &inputs(ServerMaxConnections::Fixed(300), 0, 7, vec!["DB_MAX_CONNECTIONS", "MAX_INSTANCES"]),
            None,
        )
        .unwrap();
        assert_eq!(d.budget, 42);
        let text = d.to_string();
        assert!(text.contains("[DB_MAX_CONNECTIONS]") && text.contains("[MAX_INSTANCES]"), "{text}");
    }

    #[test]
    fn budget_below_one_is_an_error_naming_the_inputs() {
        let e = compute("db:5432", &inputs(ServerMaxConnections::Fixed(20), 5, 16, vec![]), None).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("below 1") && text.contains("max_instances 16"), "{text}");
    }

    #[test]
    fn server_reserved_connections_count_on_postgres_16() {
        let limits = ServerLimits { max_connections: 100, superuser_reserved: 3, server_reserved: 7 };
        let d = compute("db:5432", &inputs(ServerMaxConnections::Auto, 0, 1, vec![]), Some(limits)).unwrap();
        assert_eq!(d.budget, 90);
    }
}
