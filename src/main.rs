//! The `fanout` binary: parses the command line, loads config, starts logging, runs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fanout::config::Settings;
use fanout::envelope::Platform;
use fanout::{app, auth, shutdown};
use tokio_util::sync::CancellationToken;

/// mimalloc instead of the system's malloc (docs/benchmarks.md, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "fanout",
    version,
    about = "Kafka → WebSocket push, filtered per user"
)]
struct Cli {
    /// Configuration file (TOML), layered over config/default.toml.
    #[arg(long, global = true, env = "FANOUT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default command).
    Serve,
    /// Load, validate and print the effective configuration (secrets masked).
    CheckConfig,
    /// Apply the database migrations and exit.
    Migrate,
    /// Mint an HS256 JWT with auth.jwt_secret.
    Token {
        #[arg(long)]
        user: String,
        /// Lifetime, e.g. 1h, 30m.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Platform claim: h5, ios or android.
        #[arg(long, value_parser = parse_platform)]
        platform: Option<Platform>,
    },
}

fn parse_platform(s: &str) -> Result<Platform, String> {
    Platform::parse(s).ok_or_else(|| "must be h5, ios or android".to_owned())
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FANOUT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    // A closed stderr (its reader gone) must not turn logging into panics.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    if std::env::var("FANOUT_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
    // A panic is logged once, in the log's format, where it happened; the task it ends is
    // then reported as failed (app::TaskWatch).
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(ToString::to_string).unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        tracing::error!(%location, message, "panic");
    }));
}

fn main() -> ExitCode {
    // FAILPOINTS, in test builds only (a no-op without the `failpoints` feature).
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fanout: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            print!("{}", settings.to_masked_toml());
            ExitCode::SUCCESS
        }
        Command::Token {
            user,
            ttl,
            platform,
        } => match auth::mint(&settings.auth, &user, ttl, platform) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fanout: {e}");
                ExitCode::from(2)
            }
        },
        Command::Migrate => {
            init_logging();
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            let result = runtime.block_on(async {
                let store = app::open_store(&settings)?;
                app::migrate(&store).await
            });
            match result {
                Ok(()) => {
                    println!("migrations applied");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("fanout: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve => {
            init_logging();
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            let served = runtime.block_on(serve(settings));
            // Not a plain drop, which waits for every blocking task: shutdown.grace is over.
            runtime.shutdown_timeout(std::time::Duration::from_millis(200));
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let public = tokio::net::TcpListener::bind(settings.server.listen)
        .await
        .with_context(|| format!("binding server.listen {}", settings.server.listen))?;
    let admin = tokio::net::TcpListener::bind(settings.admin.listen)
        .await
        .with_context(|| format!("binding admin.listen {}", settings.admin.listen))?;
    tracing::info!(
        node = %settings.node.id,
        public = %public.local_addr()?,
        admin = %admin.local_addr()?,
        "fanout listening"
    );
    let token = CancellationToken::new();
    shutdown::on_signal(token.clone());
    app::run(settings, app::Listeners { public, admin }, token).await
}
