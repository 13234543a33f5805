//! Faces HTTP: a fixed pool of threads takes requests from tiny_http, routes them, reads
//! bounded bodies, and answers with OpenAI JSON or a hand-written server-sent-event stream.

mod routes;
mod sse;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::api::Frontend;
use crate::engine::Engine;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address to bind, e.g. `127.0.0.1:8080` (loopback by default: on-box apps only).
    pub listen: String,
    /// Threads serving requests; each holds one request (a stream) at a time.
    pub http_threads: usize,
    /// Largest request body accepted; larger ones get 413 without being read.
    pub max_body_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:8080".into(), http_threads: 32, max_body_bytes: 4 << 20 }
    }
}

/// What the request handlers share.
pub(crate) struct Shared {
    /// Set once the model is loaded; until then every route answers 503.
    pub ready: OnceLock<Ready>,
    pub config: ServerConfig,
    pub started: Instant,
}

pub(crate) struct Ready {
    pub engine: Arc<Engine>,
    pub frontend: Arc<Frontend>,
}

/// A listening server. It answers from the moment it is bound (503 while the model loads),
/// so a supervisor or client sees "loading" rather than a refused connection.
pub struct Server {
    http: Arc<tiny_http::Server>,
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds `config.listen` and starts the HTTP threads.
    pub fn start(config: ServerConfig) -> Result<Self> {
        let http = tiny_http::Server::http(&config.listen)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let http = Arc::new(http);
        let shared = Arc::new(Shared { ready: OnceLock::new(), config, started: Instant::now() });
        let mut threads = Vec::new();
        for i in 0..shared.config.http_threads.max(1) {
            let http = http.clone();
            let shared = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("chatd-http-{i}"))
                .spawn(move || {
                    loop {
                        match http.recv() {
                            Ok(request) => routes::handle(&shared, request),
                            Err(e) => log::warn!("accepting a request failed: {e}"),
                        }
                    }
                })
                .context("starting an HTTP thread")?;
            threads.push(thread);
        }
        Ok(Self { http, shared, threads })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> String {
        self.http.server_addr().to_string()
    }

    /// Starts serving the API with this engine.
    pub fn set_ready(&self, engine: Arc<Engine>, frontend: Arc<Frontend>) {
        let _ = self.shared.ready.set(Ready { engine, frontend });
    }

    /// Blocks while the HTTP threads serve.
    pub fn wait(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}
