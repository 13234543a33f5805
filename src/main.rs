//! chatd: loads a model, starts the engine and serves the OpenAI API over HTTP.

use std::process::ExitCode;

use anyhow::Result;
use chat::config::{Command, Config, usage};
use chat::server::Server;
use chat::service::Service;

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
    // A missing runtime or model folder fails before the port is taken.
    Service::check(&config)?;
    // Listen first: while the model loads, /health and the API answer 503 "loading".
    let server = Server::start(config.server.clone())?;
    log::info!("listening on http://{} (loading the model)", server.local_addr());
    let service = Service::load(&config)?;
    server.set_ready(service.engine.clone(), service.frontend.clone());
    log::info!("serving {} on http://{}", service.frontend.served_name(), server.local_addr());
    server.wait();
    Ok(())
}
