//! Faces HTTP: a fixed pool of threads takes requests from tiny_http, routes them, reads
//! bounded bodies, and answers with OpenAI JSON or a hand-written server-sent-event stream.

mod routes;
mod sse;

use std::sync::Arc;
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
    pub engine: Arc<Engine>,
    pub frontend: Arc<Frontend>,
    pub config: ServerConfig,
    pub started: Instant,
}

/// A bound server; `run` serves until the process ends.
pub struct Server {
    http: Arc<tiny_http::Server>,
    shared: Arc<Shared>,
}

impl Server {
    pub fn bind(config: ServerConfig, engine: Arc<Engine>, frontend: Arc<Frontend>) -> Result<Self> {
        let http = tiny_http::Server::http(&config.listen)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        Ok(Self {
            http: Arc::new(http),
            shared: Arc::new(Shared { engine, frontend, config, started: Instant::now() }),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> String {
        self.http.server_addr().to_string()
    }

    /// Serves on `http_threads` threads; returns only if every thread has stopped.
    pub fn run(self) -> Result<()> {
        let mut threads = Vec::new();
        for i in 0..self.shared.config.http_threads.max(1) {
            let http = self.http.clone();
            let shared = self.shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("chatd-http-{i}"))
                .spawn(move || {
                    loop {
                        match http.recv() {
                            Ok(request) => routes::handle(&shared, request),
                            Err(e) => {
                                log::warn!("accepting a request failed: {e}");
                            }
                        }
                    }
                })
                .context("starting an HTTP thread")?;
            threads.push(thread);
        }
        for thread in threads {
            let _ = thread.join();
        }
        Ok(())
    }
}
