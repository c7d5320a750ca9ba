//! The `pgbroker` command: run the broker, check a config, or start a demo.

use anyhow::Context;
use clap::{Parser, Subcommand};
use pgbroker::config::Config;
use std::path::PathBuf;

/// Sidecar connection broker for PostgreSQL.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Config file.
    #[arg(long, short = 'c', global = true, default_value = "/etc/pgbroker/pgbroker.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (the default).
    Run,
    /// Validate the config file and print the effective settings.
    Check,
    /// Write a working setup for the app's database: the config (at --config), the env file
    /// with the server password and the auth file beside it (both 0600), after checking the
    /// server; then print the DATABASE_URL to give the app.
    Init {
        /// The app's connection URL [default: $DATABASE_URL].
        #[arg(long = "from")]
        from: Option<String>,
        /// Overwrite files that exist.
        #[arg(long)]
        force: bool,
        /// App instances sharing the server, each with its own pgbroker (static budget).
        #[arg(long, conflicts_with = "fleet")]
        instances: Option<u32>,
        /// Share the server live with the other instances of this fleet instead.
        #[arg(long)]
        fleet: Option<String>,
        /// session | transaction | statement.
        #[arg(long, default_value = "transaction")]
        pool_mode: String,
        /// Address for the broker's PostgreSQL listener (HTTP on the next port).
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: std::net::SocketAddr,
    },
    /// Start pgbroker in front of a throwaway PostgreSQL (or --database-url), until Ctrl-C.
    Demo {
        /// Address for the demo broker's PostgreSQL listener.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: std::net::SocketAddr,
        /// Put pgbroker in front of this existing server instead of a throwaway one.
        #[arg(long)]
        database_url: Option<String>,
    },
}

/// Logs to stderr: human lines, or JSON objects with `log_format = "json"`. `RUST_LOG`
/// filters (default `info`).
fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.with_writer(std::io::stderr).json().init();
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        // Peer-chosen strings (user names, databases, channels) stay inside their line.
        let writer = move || pgbroker::logline::OneLine::new(std::io::stderr(), ansi);
        builder.with_writer(writer).with_ansi(ansi).init();
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::Run = command {
        let config = Config::load(&cli.config)?;
        init_logging(config.broker.log_format == pgbroker::config::LogFormat::Json);
        config.warn_insecure_files();
        return runtime()?.block_on(pgbroker::app::run(config));
    }
    init_logging(false);
    match command {
        Command::Check => {
            let config = Config::load(&cli.config)?;
            config.warn_insecure_files();
            print!("{}", config.describe());
            // The budget is part of the effective settings; with "auto" this reads the server.
            let budgets = runtime()?.block_on(pgbroker::budget::derive_all(&config))?;
            println!();
            for d in budgets.values() {
                println!("# {d}");
            }
            eprintln!("{}: OK", cli.config.display());
            Ok(())
        }
        Command::Init { from, force, instances, fleet, pool_mode, listen } => {
            let url = from
                .or_else(|| std::env::var("DATABASE_URL").ok())
                .context("give the app's URL with --from, or set DATABASE_URL")?;
            let pool_mode = match pool_mode.as_str() {
                "session" => pgbroker::config::PoolMode::Session,
                "transaction" => pgbroker::config::PoolMode::Transaction,
                "statement" => pgbroker::config::PoolMode::Statement,
                other => anyhow::bail!("--pool-mode: expected session, transaction or statement, got {other:?}"),
            };
            let opts = pgbroker::init::Options { url, config: cli.config, force, instances, fleet, pool_mode, listen };
            let written = runtime()?.block_on(pgbroker::init::run(&opts))?;
            for f in &written.files {
                println!("wrote {}", f.display());
            }
            for b in &written.budgets {
                println!("# {b}");
            }
            println!("Give the app this URL instead of its own:\nDATABASE_URL={}", written.app_url);
            println!("Then start the broker: systemctl enable --now pgbroker");
            Ok(())
        }
        Command::Run => Ok(()),
        Command::Demo { listen, database_url } => runtime()?.block_on(pgbroker::demo::run(listen, database_url)),
    }
}

/// Multi-thread, one worker per core. Measured on the 2-core development machine against a
/// current-thread runtime and a single worker (load bench `--broker-workers 0|1|2`, -S simple,
/// 50 / 200 clients, CPU µs per transaction with PgBouncer's alongside): 46.9 / 51.1 (38.6 /
/// 42.0) with 0, 50.3 / 58.1 (37.1 / 40.9) with 1, 45.8 / 54.8 (38.6 / 40.2) with 2, tps
/// 0.99 / 0.98, 0.89 / 0.81 and 1.27 / 1.02 of PgBouncer's. Not a clear win for either
/// other choice, and a single thread would also run every login's SCRAM hashing and TLS
/// handshake in line with all relaying, so the default stays.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}
