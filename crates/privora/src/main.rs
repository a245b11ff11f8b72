//! The `privora` command: run the server, mint development tokens, migrate the database.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use privora::auth::dev::DevVerifier;
use privora::config::{AuthMode, LogFormat, Settings};
use privora::store::UserRecord;

#[derive(Parser)]
#[command(name = "privora", version, about = "Real-time chat backend, wire-compatible with Privora")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default when no command is given).
    Serve,
    /// Print a development token for USER_ID (an email or any id) and register the user,
    /// so that others can message it before its first login.
    Token {
        user_id: String,
        /// Display name carried by the token.
        #[arg(long)]
        name: Option<String>,
        /// How long the token is valid, in hours.
        #[arg(long, default_value_t = 24 * 30)]
        ttl_hours: u64,
    },
    /// Create or update the database schema, then exit (`serve` does this by itself too).
    Migrate,
    /// Exit 0 if the server on --listen answers `/healthz` (the container's HEALTHCHECK, so the
    /// image needs no curl).
    Healthcheck,
}

/// Removes the settings' environment variables that are set but empty, so that an empty one
/// counts as unset. Docker Compose passes `VAR: ${VAR:-}` on as an empty variable, and clap
/// takes that as a value: an empty `FIREBASE_ADMIN_CREDENTIALS_JSON` was refused as a missing
/// path and an empty `PRIVORA_DEV_SECRET` as a short secret, so the compose file's backend did
/// not start. Called first thing in `main`, before any other thread exists.
fn forget_empty_settings() {
    let command = <Cli as clap::CommandFactory>::command();
    for name in command.get_arguments().filter_map(|arg| arg.get_env()) {
        if std::env::var_os(name).is_some_and(|value| value.is_empty()) {
            std::env::remove_var(name);
        }
    }
}

fn main() -> ExitCode {
    // A missing .env is normal; a broken one is worth saying.
    if let Err(error) = dotenvy::dotenv() {
        if !error.not_found() {
            eprintln!("privora: cannot read .env: {error}");
            return ExitCode::FAILURE;
        }
    }
    forget_empty_settings();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.settings.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cli.settings.log_format {
        LogFormat::Text => logs.init(),
        // One JSON object a line, with the span fields (client address, ...) flattened in.
        LogFormat::Json => {
            logs.json().flatten_event(true).with_current_span(true).with_span_list(false).init()
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("privora: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("privora: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.settings.validate()?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config).await,
        Command::Token { user_id, name, ttl_hours } => {
            let AuthMode::Development { secret } = &config.auth else {
                anyhow::bail!(
                    "FIREBASE_ADMIN_CREDENTIALS_JSON is set: this server accepts Firebase ID tokens only, \
                     not development tokens"
                );
            };
            if user_id.is_empty() || user_id.len() > 128 {
                anyhow::bail!("USER_ID must be 1 to 128 characters");
            }
            let store = privora::server::open_store(&config).await?;
            let verifier = DevVerifier::new(secret)?;
            let email = user_id.contains('@').then(|| user_id.clone());
            store
                .upsert_user(UserRecord { user_id: user_id.clone(), display_name: name.clone(), email })
                .await?;
            store.close().await;
            println!("{}", verifier.mint(&user_id, name.as_deref(), Duration::from_secs(ttl_hours * 3600)));
            Ok(())
        }
        Command::Migrate => {
            let store = privora::server::open_store(&config).await?;
            store.close().await;
            eprintln!("privora: the database schema is up to date");
            Ok(())
        }
        Command::Healthcheck => healthcheck(config.listen).await,
    }
}

async fn serve(config: privora::config::Config) -> anyhow::Result<()> {
    if let AuthMode::Development { .. } = config.auth {
        tracing::warn!(
            "DEVELOPMENT AUTH MODE: no FIREBASE_ADMIN_CREDENTIALS_JSON, so logins use tokens made by \
             `privora token <user-id>`. Do not expose this server to the internet."
        );
    }
    let mut server = privora::start(config.clone()).await?;
    tracing::info!(
        addr = %server.addr(),
        database = ?config.database,
        auth = ?server.state().verifier,
        "privora is listening (WebSocket at /ws)"
    );
    if config.web_dir.is_some() {
        tracing::info!("web client: open http://{}/ in a browser", server.addr());
    }
    tokio::select! {
        result = server.wait() => {
            result?;
            return Ok(());
        }
        _ = shutdown_signal() => {}
    }
    tracing::info!("shutting down: closing connections, finishing writes");
    server.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// GET /healthz on our own port (127.0.0.1 when listening on all addresses); 200 or an error.
async fn healthcheck(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let check = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n").await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        Ok::<_, std::io::Error>(head)
    };
    let head = tokio::time::timeout(Duration::from_secs(3), check)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within 3 s"))?
        .map_err(|e| anyhow::anyhow!("cannot reach {addr}: {e}"))?;
    if &head[9..12] != b"200" {
        anyhow::bail!("{addr}/healthz answered {}", String::from_utf8_lossy(&head));
    }
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
