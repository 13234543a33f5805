//! Faces HTTP: a fixed pool of threads takes requests from tiny_http, routes them, reads
//! bounded bodies, and answers with OpenAI JSON or a hand-written server-sent-event stream.

mod auth;
mod metrics;
mod route;
mod routes;
mod slot;
mod sse;

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::api::Frontend;
use crate::engine::Engine;
use auth::ApiKeys;
use metrics::Metrics;
use slot::ModelSlot;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address to bind, e.g. `127.0.0.1:8080` (loopback by default: on-box apps only).
    pub listen: String,
    /// Threads serving requests; each holds one request (a stream) at a time.
    pub http_threads: usize,
    /// Largest request body accepted; larger ones get 413 without being read.
    pub max_body_bytes: usize,
    /// Largest request line plus headers; larger ones get 431.
    pub max_header_bytes: usize,
    /// Connections served at once (each holds a reading thread); more get 503 and are closed.
    pub max_connections: usize,
    /// A connection that sends nothing for this long, or takes longer for a request's head or
    /// body, is closed; a client that reads nothing for this long is treated as gone.
    pub idle_timeout: Duration,
    /// On SIGTERM, requests in flight get this long to finish before they are cancelled.
    pub shutdown_timeout: Duration,
    /// A file of accepted API keys; `None`: no key is needed.
    pub api_keys_file: Option<PathBuf>,
    /// Whether `/health` and `/metrics` need a key too (when keys are configured).
    pub auth_health: bool,
    pub auth_metrics: bool,
    /// Log prompt text (debug level); off by default, prompts are private.
    pub log_prompts: bool,
    /// Release the model after this long without requests, and load it again for the next one.
    pub idle_unload: Option<Duration>,
    /// A stream that has sent nothing for this long gets a comment line, so that proxies and
    /// clients with idle timeouts keep it through a long prompt; `None`: never.
    pub sse_keepalive: Option<Duration>,
    /// Web origins whose pages may call the API (CORS); `*` for any; empty: no CORS headers.
    pub cors_origins: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            http_threads: 32,
            max_body_bytes: 4 << 20,
            max_header_bytes: 8 << 10,
            max_connections: 128,
            idle_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            api_keys_file: None,
            auth_health: false,
            auth_metrics: false,
            log_prompts: false,
            idle_unload: None,
            sse_keepalive: Some(Duration::from_secs(15)),
            cors_origins: Vec::new(),
        }
    }
}

/// What the request handlers share.
pub(crate) struct Shared {
    /// The model: loading, ready, or asleep. Requests wait for it; `/health` does not.
    pub slot: ModelSlot<Ready>,
    /// What `/v1/models` says, kept from the first load so that listing does not wake the model.
    pub card: OnceLock<serde_json::Value>,
    /// Replaced on reload.
    config: RwLock<ServerConfig>,
    keys: RwLock<ApiKeys>,
    pub connections: Arc<tiny_http::ConnectionLimits>,
    pub metrics: Metrics,
    pub started: Instant,
    /// Set on SIGTERM: new work is refused, `/health` says "draining".
    pub draining: AtomicBool,
    /// Generation requests being answered.
    pub in_flight: AtomicUsize,
    /// Bytes of request bodies held by handlers now.
    pub body_bytes: AtomicUsize,
}

impl Shared {
    pub fn config(&self) -> ServerConfig {
        self.config.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn keys(&self) -> std::sync::RwLockReadGuard<'_, ApiKeys> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) struct Ready {
    pub engine: Arc<Engine>,
    pub frontend: Arc<Frontend>,
    /// What loading the model took of the resident size (see `Service::model_bytes`).
    pub model_bytes: usize,
    pub budget: crate::service::MemoryBudget,
}

/// A listening server. It answers from the moment it is bound: `/health` says "loading" while
/// the model loads, and requests wait for it (up to `load_wait`), so neither a supervisor nor
/// the client whose connection started the daemon sees a refused connection.
pub struct Server {
    http: Arc<tiny_http::Server>,
    shared: Arc<Shared>,
    /// Calls from requests that found the model asleep.
    wake_calls: crossbeam_channel::Receiver<()>,
    threads: Vec<std::thread::JoinHandle<()>>,
    local_addr: String,
}

impl Server {
    /// Serves on `listener` (an inherited socket, e.g. from systemd), else binds
    /// `config.listen`, and starts the HTTP threads.
    /// Requests wait up to `load_wait` for the model to load (`max_queue_wait_s`).
    pub fn start(config: ServerConfig, listener: Option<TcpListener>, load_wait: Duration) -> Result<Self> {
        let keys = ApiKeys::load(config.api_keys_file.as_deref())?;
        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind(&config.listen).with_context(|| format!("cannot listen on {}", config.listen))?,
        };
        let local_addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| config.listen.clone());
        let connections =
            tiny_http::ConnectionLimits::new(config.max_connections, config.idle_timeout, config.max_header_bytes);
        connections.set_rejection_body(rejection_body);
        let http = tiny_http::Server::from_listener_with_limits(listener, None, connections.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("cannot serve on {local_addr}"))?;
        let http = Arc::new(http);
        let (slot, wake_calls) = ModelSlot::new(load_wait);
        let shared = Arc::new(Shared {
            slot,
            card: OnceLock::new(),
            config: RwLock::new(config),
            keys: RwLock::new(keys),
            connections,
            metrics: Metrics::new(),
            started: Instant::now(),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            body_bytes: AtomicUsize::new(0),
        });
        let mut threads = Vec::new();
        for i in 0..shared.config().http_threads.max(1) {
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
        Ok(Self { http, shared, wake_calls, threads, local_addr })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> String {
        self.local_addr.clone()
    }

    /// Serves the API with this service, also to the requests waiting for it; `load_time` is
    /// reported in /metrics.
    pub fn set_ready(&self, service: &crate::service::Service, load_time: Duration) {
        self.shared.metrics.model_load_ms.store(load_time.as_millis() as u64, Ordering::Relaxed);
        let ready = Ready {
            engine: service.engine.clone(),
            frontend: service.frontend.clone(),
            model_bytes: service.model_bytes,
            budget: service.budget.clone(),
        };
        let _ = self.shared.card.set(routes::model_card(&ready));
        self.shared.slot.set_ready(ready);
    }

    /// Loading the model again failed: the requests waiting for it get 503 with `why`.
    pub fn set_load_failed(&self, why: String) {
        self.shared.slot.set_failed(why);
    }

    /// Receives a message each time a request finds the model asleep.
    pub fn wake_calls(&self) -> &crossbeam_channel::Receiver<()> {
        &self.wake_calls
    }

    /// Releases the model when `idle_unload_s` has passed without requests: `release` drops
    /// the caller's own hold on it, and what it held goes back to the system before `/health`
    /// says "sleeping". Returns whether it did.
    pub fn release_if_idle(&self, release: impl FnOnce()) -> bool {
        let Some(idle) = self.shared.config().idle_unload else { return false };
        let Some(mut ready) = self.shared.slot.release_if_idle(idle, &self.shared.in_flight) else {
            return false;
        };
        // Only `/health`, `/metrics` and `/v1/models` can hold it still (generation requests
        // count themselves busy first), each for a moment.
        loop {
            match Arc::try_unwrap(ready) {
                Ok(ready) => break drop(ready),
                Err(shared) => ready = shared,
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        release();
        crate::memory::give_back_freed();
        self.shared.slot.released();
        true
    }

    /// The settings in force (they change on reload).
    pub fn config(&self) -> ServerConfig {
        self.shared.config()
    }

    /// Generation requests being answered now.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Stops taking new work: API requests get 503 and `/health` says "draining"; requests
    /// waiting for the model to load get 503 at once.
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        self.shared.slot.close("the server is shutting down; retry on another instance or shortly");
    }

    /// Applies what can change without a restart (limits, timeouts, API keys) from a freshly
    /// read configuration. Nothing changes if the new keys cannot be read. Says whether the
    /// keys changed (the settings' changes are `config::changes`).
    pub fn reload(&self, new: &ServerConfig) -> Result<Vec<String>> {
        let keys = ApiKeys::load(new.api_keys_file.as_deref())?;
        let mut changed = Vec::new();
        {
            let mut config = self.shared.config.write().unwrap_or_else(|e| e.into_inner());
            let (listen, threads) = (config.listen.clone(), config.http_threads);
            *config = new.clone();
            // Fixed at start.
            config.listen = listen;
            config.http_threads = threads;
        }
        let c = &self.shared.connections;
        c.max_connections.store(new.max_connections, Ordering::Relaxed);
        c.idle_timeout_ms.store(new.idle_timeout.as_millis() as u64, Ordering::Relaxed);
        c.max_head_bytes.store(new.max_header_bytes, Ordering::Relaxed);
        let mut current = self.shared.keys.write().unwrap_or_else(|e| e.into_inner());
        if *current != keys {
            changed.push(format!("api keys ({})", keys.len()));
        }
        *current = keys;
        Ok(changed)
    }

    /// Blocks while the HTTP threads serve.
    pub fn wait(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
        drop(self.http);
    }
}

/// The body of an answer tiny_http gives itself (its status is the library's): an OpenAI error
/// object, as every other error chatd sends.
fn rejection_body(rejection: tiny_http::Rejection) -> (String, Vec<u8>) {
    use tiny_http::Rejection::*;
    let (code, message) = match rejection {
        TooManyConnections => ("too_many_connections", "The server has too many open connections; retry shortly."),
        BadRequestLine => ("bad_request_line", "The request line is not valid HTTP."),
        BadHeader => ("bad_header", "A request header is not valid HTTP."),
        BadRequest(message) => ("bad_request", message),
        HeadTooLarge => ("headers_too_large", "The request line and headers are larger than this server accepts."),
        HeadTimeout => ("request_timeout", "The request's headers did not arrive in time."),
        ExpectationFailed => ("expectation_failed", "Only `Expect: 100-continue` is supported."),
        HttpVersionNotSupported => {
            ("http_version_not_supported", "This server only supports HTTP versions 1.0 and 1.1.")
        }
    };
    let body = crate::api::error_json(message, "invalid_request_error", None, Some(code));
    ("application/json".to_owned(), body.to_string().into_bytes())
}
