use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use semcache::config::{
    CalibrateArgs, Cli, Command, ContextMode, EvalCommand, EvalConversationsArgs, EvalOptions, ModelArgs,
    ServeArgs,
};
use semcache::embed::{self, Embedder};
use semcache::eval;
use semcache::judge::Judge;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(*args).await,
        Command::Eval(EvalCommand::Pairs(args)) => eval_pairs(&args.file, &args.options).await,
        Command::Eval(EvalCommand::Intents(args)) => {
            eval_intents(&args.train, &args.test, &args.options).await
        }
        Command::Eval(EvalCommand::Conversations(args)) => eval_conversations(&args).await,
        Command::Calibrate(args) => calibrate(args).await,
    }
}

async fn load_model(model: &ModelArgs) -> anyhow::Result<Arc<dyn Embedder>> {
    let (backend, paths) = (model.embedder, model.paths());
    let embedder = tokio::task::spawn_blocking(move || embed::load(backend, &paths))
        .await?
        .context("loading the embedding model")?;
    Ok(embedder)
}

/// Draws the report's curves when `--plot` asks, and prints it as JSON when `--json` does,
/// with the judged rows under `judged` when there are any: then nothing more is printed
/// (returns true).
fn plot_or_json(
    options: &EvalOptions,
    title: &str,
    series: &[eval::Series],
    report: &impl serde::Serialize,
    judged: &[eval::JudgedRow],
) -> anyhow::Result<bool> {
    if let Some(path) = &options.plot {
        eval::plot(path, title, series, options.font.as_deref())?;
    }
    if options.json {
        let mut value = serde_json::to_value(report)?;
        if !judged.is_empty() {
            value["judged"] = serde_json::to_value(judged)?;
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    }
    Ok(options.json)
}

async fn eval_pairs(file: &Path, options: &EvalOptions) -> anyhow::Result<()> {
    options.validate().map_err(anyhow::Error::msg)?;
    let pairs = eval::sample(eval::read_pairs(file)?, options.sample, options.seed);
    let embedder = load_model(&options.model).await?;
    let grid = options.thresholds.clone().with(options.threshold);
    let report = eval::eval_pairs(&embedder, &pairs, &grid).await?;
    let judged = if options.judged() {
        let judges = judges(options, eval::pairs_truth(&pairs))?;
        eval::judge_pairs(&embedder, &pairs, options.threshold, &judges).await?
    } else {
        Vec::new()
    };
    let title = format!("{} ({} pairs)", file.display(), report.pairs);
    if plot_or_json(options, &title, &eval::pairs_series(&report), &report, &judged)? {
        return Ok(());
    }
    println!(
        "{} pairs from {}: {} duplicates, {} non-duplicates.\n",
        report.pairs,
        file.display(),
        report.duplicates,
        report.non_duplicates
    );
    print!("{}", eval::pairs_table(&report, options.threshold));
    if let Some(summary) = eval::verifier_summary(&report, options.threshold) {
        println!("\n{summary}");
    }
    print_judged(&judged, options.threshold, options);
    Ok(())
}

/// The table of an eval run through judges, when it was.
fn print_judged(rows: &[eval::JudgedRow], threshold: f32, options: &EvalOptions) {
    if !rows.is_empty() {
        print!(
            "\n{}",
            eval::judged_table(rows, threshold, &options.judge_policy())
        );
    }
}

/// The judges an eval runs through: none first (the verifier alone), then the real judge if
/// one is named, then each simulated one.
fn judges(options: &EvalOptions, truth: eval::Truth) -> anyhow::Result<Vec<Option<Judge>>> {
    let mut judges = vec![None];
    if let Some(config) = options.judge_config() {
        judges.push(Some(Judge::over_http(&config).context("the judge's address")?));
    }
    for &accuracy in &options.judge_simulated {
        let policy = options.judge_policy();
        judges.push(Some(eval::simulated(
            Arc::clone(&truth),
            accuracy,
            options.seed,
            policy,
        )));
    }
    Ok(judges)
}

async fn eval_intents(train: &Path, test: &Path, options: &EvalOptions) -> anyhow::Result<()> {
    options.validate().map_err(anyhow::Error::msg)?;
    let stored = eval::read_intents(train)?;
    let asked = eval::sample(eval::read_intents(test)?, options.sample, options.seed);
    let embedder = load_model(&options.model).await?;
    let grid = options.thresholds.clone().with(options.threshold);
    let report = eval::eval_intents(&embedder, &stored, &asked, &grid).await?;
    let judged = if options.judged() {
        let judges = judges(options, eval::intents_truth(&stored, &asked))?;
        eval::judge_intents(&embedder, &stored, &asked, options.threshold, &judges).await?
    } else {
        Vec::new()
    };
    let title = format!("{} stored, {} asked", report.stored, report.asked);
    if plot_or_json(options, &title, &eval::intents_series(&report), &report, &judged)? {
        return Ok(());
    }
    println!(
        "{} queries stored from {}, {} asked from {}.\n",
        report.stored,
        train.display(),
        report.asked,
        test.display()
    );
    print!("{}", eval::intents_table(&report, options.threshold));
    print_judged(&judged, options.threshold, options);
    Ok(())
}

async fn eval_conversations(args: &EvalConversationsArgs) -> anyhow::Result<()> {
    let (file, options) = (&args.file, &args.options);
    options.validate().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        options.judge_simulated.is_empty(),
        "--judge-simulated needs a label per pair of requests, and conversation pairs are labelled as wholes: use --judge-model"
    );
    let pairs = eval::sample(eval::read_conversations(file)?, options.sample, options.seed);
    let embedder = load_model(&options.model).await?;
    let marked = match args.context {
        ContextMode::Exact => options.threshold,
        ContextMode::Semantic => args.context_threshold,
    };
    let grid = options.thresholds.clone().with(marked);
    let report = match args.context {
        ContextMode::Exact => eval::eval_conversations(&embedder, &pairs, &grid).await?,
        ContextMode::Semantic => eval::eval_conversations_semantic(&embedder, &pairs, &grid).await?,
    };
    let judged = if options.judged() {
        // Only a real judge runs here (refused above otherwise): the labels are not asked.
        let truth: eval::Truth = Arc::new(|_: &str, _: &str| false);
        let semantic = args.context == ContextMode::Semantic;
        let judges = judges(options, truth)?;
        eval::judge_conversations(&embedder, &pairs, semantic, marked, &judges).await?
    } else {
        Vec::new()
    };
    let title = format!("{} ({} conversation pairs)", file.display(), report.pairs);
    if plot_or_json(
        options,
        &title,
        &eval::conversations_series(&report),
        &report,
        &judged,
    )? {
        return Ok(());
    }
    println!(
        "{} conversation pairs from {}: {} should hit, {} traps; context compared {}.\n",
        report.pairs,
        file.display(),
        report.should_hit,
        report.traps,
        report.context
    );
    print!("{}", eval::conversations_table(&report, marked));
    print_judged(&judged, marked, options);
    Ok(())
}

async fn calibrate(args: CalibrateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.max_false_hit_rate),
        "--max-false-hit-rate must be within [0, 1], got {}",
        args.max_false_hit_rate
    );
    let pairs = eval::sample(eval::read_pairs(&args.file)?, args.sample, args.seed);
    let embedder = load_model(&args.model).await?;
    let grid = eval::Grid::new(50, 99, 1);
    let report = eval::eval_pairs(&embedder, &pairs, &grid).await?;
    let rows = if args.verify {
        &report.verified
    } else {
        &report.plain
    };
    let verification = if args.verify { "with" } else { "without" };
    let Some(row) = eval::recommend(rows, args.max_false_hit_rate) else {
        anyhow::bail!(
            "no threshold up to 0.99 keeps the false-hit rate at or under {:.1}% {verification} verification on these {} pairs",
            args.max_false_hit_rate * 100.0,
            report.pairs
        );
    };
    println!(
        "Recommended threshold: {:.2} ({verification} verification, {} pairs).\n\
         False-hit rate {:.1}% (at most {:.1}% asked), recall {:.1}%, precision {:.1}%.\n\
         Apply it with PATCH /admin/config {{\"threshold\": {:.2}}} or --threshold {:.2}.",
        row.threshold,
        report.pairs,
        row.false_hit_rate * 100.0,
        args.max_false_hit_rate * 100.0,
        row.recall * 100.0,
        row.precision * 100.0,
        row.threshold,
        row.threshold,
    );
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    args.validate().map_err(anyhow::Error::msg)?;
    tracing::info!(model_dir = %args.model.model_dir.display(), "loading the embedding model");
    let embedder = load_model(&args.model).await?;
    tracing::info!(embedder = %embedder.model_id(), "embedding model loaded");
    let app = semcache::app(&args, embedder)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        upstream = %args.upstream,
        threshold = %app.settings.load().threshold,
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
