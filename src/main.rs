use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use semcache::config::{Cli, Command, ServeArgs};
use semcache::embed::BertEmbedder;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    args.validate().map_err(anyhow::Error::msg)?;
    tracing::info!(model_dir = %args.model_dir.display(), "loading the embedding model");
    let model_dir = args.model_dir.clone();
    let embedder = tokio::task::spawn_blocking(move || BertEmbedder::load(&model_dir))
        .await?
        .context("loading the embedding model")?;
    let app = semcache::app(&args, Arc::new(embedder)).context("setting up the upstream client")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        upstream = %args.upstream,
        threshold = %args.threshold,
        scope = ?args.scope,
        "semcache is serving"
    );
    semcache::run(app, listener, shutdown_signal()).await?;
    tracing::info!("semcache stopped");
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: finishing requests in flight");
}
