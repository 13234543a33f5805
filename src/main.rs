//! chatd: loads a model, starts the engine and serves the OpenAI API over HTTP.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use chat::api::{Frontend, Limits};
use chat::config::{Command, Config, usage};
use chat::engine::Engine;
use chat::model::{Model, runtime};
use chat::server::Server;
use chat::text::Tokenizer;

const NO_MODEL: &str = "no model folder: pass --model DIR or set CHATD_MODEL. A folder holds model.onnx, config.json, \
     tokenizer.json and tokenizer_config.json in the Hugging Face Optimum layout; for example \
     `huggingface-cli download HuggingFaceTB/SmolLM2-135M-Instruct --include 'onnx/model.onnx' '*.json' --local-dir smollm2`";

fn main() -> ExitCode {
    let command = match Config::parse(std::env::args().skip(1), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chatd: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match command {
        Command::Help => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            println!("chatd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Command::Serve(config) => *config,
    };
    env_logger::Builder::new()
        .parse_filters(&format!("{},ort=warn", config.log_level))
        .parse_env("RUST_LOG")
        .format_timestamp_millis()
        .init();
    match serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> Result<()> {
    let model_dir = config.model.clone().context(NO_MODEL)?;
    if !model_dir.is_dir() {
        anyhow::bail!("model folder {} does not exist; {NO_MODEL}", model_dir.display());
    }
    runtime::init(&config.runtime)?;
    // Listen first: while the model loads, /health and the API answer 503 "loading".
    let server = Server::start(config.server.clone())?;
    log::info!("listening on http://{} (loading the model)", server.local_addr());
    let started = std::time::Instant::now();
    let tokenizer = Arc::new(Tokenizer::load(&model_dir)?);
    let model = Model::load(&model_dir, &config.runtime)?;
    log::info!(
        "loaded {} ({} layout) in {:.2}s: {} layers, {} KV heads x {}, context {}, eos {:?}",
        model_dir.display(),
        model.layout_name(),
        started.elapsed().as_secs_f64(),
        model.info().num_layers,
        model.info().num_kv_heads,
        model.info().head_dim,
        model.info().context_length,
        model.info().eos_token_ids
    );
    let engine = Arc::new(Engine::start(model, tokenizer, config.engine.clone())?);
    let frontend = Arc::new(Frontend::new(&engine, config.served_model_name.clone(), Limits::default())?);
    server.set_ready(engine, frontend.clone());
    log::info!("serving {} on http://{}", frontend.served_name(), server.local_addr());
    server.wait();
    Ok(())
}
