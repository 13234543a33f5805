use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde_json::{Value, json};
use tiny_http::{Header, Method, Request, Response};

use super::metrics::Gauges;
use super::route::Route;
use super::slot::{Phase, Unavailable};
use super::sse::SseWriter;
use super::{Ready, ServerConfig, Shared};
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;

use crate::api::{ApiError, Collector, Ended, Endpoint, Frontend, ParsedRequest, StreamEncoder, follow};
use crate::engine::{Event, RequestHandle, StatsSnapshot, Timings, Usage};

thread_local! {
    /// The `Access-Control-Allow-Origin` value for the request this thread is answering, when
    /// `cors_origins` allows the page it comes from; every response written adds it.
    static CORS_ORIGIN: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Numbers requests in the log.
static REQUEST_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// What one request did, for its log line.
#[derive(Default)]
struct Outcome {
    status: u16,
    usage: Option<Usage>,
    timings: Option<Timings>,
    note: Option<String>,
    /// Counted in `in_flight` until it is recorded in the metrics.
    in_flight: bool,
}

impl Outcome {
    fn status(status: u16) -> Self {
        Self { status, ..Self::default() }
    }
}

pub(super) fn handle(shared: &Shared, request: Request) {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.url().split('?').next().unwrap_or("").to_owned();
    let id = REQUEST_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let origin = allowed_origin(&shared.config().cors_origins, &request);
    CORS_ORIGIN.with(|o| *o.borrow_mut() = origin);
    let outcome = route(shared, request, &method, &path);
    CORS_ORIGIN.with(|o| *o.borrow_mut() = None);
    let elapsed = started.elapsed();
    shared.metrics.record(Route::label_of(&path), outcome.status, elapsed, outcome.usage, outcome.timings);
    // Only once counted: a scrape that sees nothing in flight sees every request.
    if outcome.in_flight {
        shared.in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
    let shown_path: String = path.chars().take(64).collect();
    let mut line = format!("#{id} {method} {shown_path:?} {} {:.1}ms", outcome.status, elapsed.as_secs_f64() * 1e3);
    if let Some(u) = outcome.usage {
        line += &format!(" prompt={} completion={} cached={}", u.prompt_tokens, u.completion_tokens, u.cached_tokens);
    }
    if let Some(t) = outcome.timings {
        line += &format!(
            " queue={:.1}ms ttft={:.1}ms model={:.1}ms sample={:.1}ms detok={:.1}ms",
            t.queued.as_secs_f64() * 1e3,
            t.time_to_first_token.as_secs_f64() * 1e3,
            t.model.as_secs_f64() * 1e3,
            t.sampling.as_secs_f64() * 1e3,
            t.detokenize.as_secs_f64() * 1e3
        );
    }
    if let Some(note) = outcome.note {
        line += &format!(" ({note})");
    }
    log::info!("{line}");
}

fn route(shared: &Shared, request: Request, method: &Method, path: &str) -> Outcome {
    let config = shared.config();
    let route = Route::of(path);
    // A browser's preflight carries no API key; it is answered for allowed origins only.
    if let (Method::Options, Some(route)) = (method, route)
        && CORS_ORIGIN.with(|o| o.borrow().is_some())
    {
        return respond_preflight(request, route);
    }
    let open = match route {
        Some(Route::Health) => !config.auth_health,
        Some(Route::Metrics) => !config.auth_metrics,
        _ => false,
    };
    let keys = shared.keys();
    if !open && !keys.is_empty() {
        let authorization = request.headers().iter().find(|h| h.field.equiv("Authorization")).map(|h| h.value.as_str());
        if !keys.accepts(authorization) {
            let error = ApiError::unauthorized(authorization.is_some());
            let mut outcome =
                respond_with(request, error.status(), &error.to_json(), &[("WWW-Authenticate", "Bearer")]);
            outcome.note = Some(error.message);
            return outcome;
        }
    }
    drop(keys);
    let Some(route) = route else { return respond_error(request, &ApiError::not_found(path)) };
    let allowed = route.method();
    if method.as_str() != allowed {
        let err = ApiError::method_not_allowed(method.as_str(), path, allowed);
        let mut outcome = respond_with(request, err.status(), &err.to_json(), &[("Allow", allowed)]);
        outcome.note = Some(err.message);
        return outcome;
    }
    // Health and metrics answer while draining: the supervisor watches the drain through them.
    if !matches!(route, Route::Health | Route::Metrics) && shared.draining.load(Ordering::SeqCst) {
        return respond_with(
            request,
            503,
            &ApiError::unavailable("the server is shutting down; retry on another instance or shortly").to_json(),
            &[("Connection", "close"), ("Retry-After", "5")],
        );
    }
    match route {
        Route::ChatCompletions | Route::Completions => {
            let endpoint = if route == Route::ChatCompletions { Endpoint::Chat } else { Endpoint::Completion };
            with_model(shared, request, |ready, request| {
                generate(&config, ready, &shared.body_bytes, request, endpoint)
            })
        }
        Route::Tokenize | Route::Detokenize | Route::ApplyTemplate => {
            with_model(shared, request, |ready, request| text_tool(&config, ready, &shared.body_bytes, request, route))
        }
        Route::Models | Route::Model => respond_models(shared, request, path),
        Route::Health => respond_health(shared, request),
        Route::Metrics => respond_metrics(shared, request),
    }
}

/// `/v1/models` and `/v1/models/ID`: answered from the card kept since the first load, so
/// listing models does not wake a sleeping one.
fn respond_models(shared: &Shared, request: Request, path: &str) -> Outcome {
    let card = match shared.card.get() {
        Some(card) => card,
        None => match shared.slot.acquire() {
            Ok(_) => shared.card.get().expect("set before the model is served"),
            Err(e) => return respond_error(request, &unavailable(e)),
        },
    };
    match path.strip_prefix("/v1/models/") {
        None => respond_json(request, 200, &json!({"object": "list", "data": [card]})),
        Some(id) if card["id"] == id => respond_json(request, 200, card),
        Some(id) => respond_error(request, &ApiError::model_not_found(id)),
    }
}

fn unavailable(why: Unavailable) -> ApiError {
    match why {
        Unavailable::Loading => ApiError::unavailable("the model is loading; retry shortly"),
        Unavailable::Failed(why) => ApiError::unavailable(format!("the model could not be loaded: {why}")),
    }
}

fn respond_health(shared: &Shared, request: Request) -> Outcome {
    if shared.draining.load(Ordering::SeqCst) {
        return respond_json(request, 503, &json!({"status": "draining", "reason": "the server is shutting down"}));
    }
    let (phase, ready) = shared.slot.current();
    match (phase, ready) {
        (_, Some(ready)) => respond_json(request, 200, &health_json(shared, &ready)),
        (Phase::Loading, None) => {
            respond_json(request, 503, &json!({"status": "loading", "reason": "the model is loading"}))
        }
        (phase, None) => {
            let (status, reason) = match phase {
                Phase::Waking => ("waking", "a request came; the model is loading again"),
                Phase::Releasing => ("releasing", "no requests for idle_unload_s; the model is being released"),
                _ => ("sleeping", "no requests for idle_unload_s; the next request loads the model again"),
            };
            let memory = memory_use(shared, None);
            let body = json!({
                "status": status,
                "reason": reason,
                "model": shared.card.get().map(|c| c["id"].clone()),
                "uptime_seconds": shared.started.elapsed().as_secs(),
                "model_loads": shared.slot.loads.load(Ordering::Relaxed),
                "memory": {"resident_bytes": memory.resident, "requests_bytes": memory.requests, "other_bytes": memory.other},
            });
            respond_json(request, 200, &body)
        }
    }
}

/// What `/v1/models` says of the model.
pub(super) fn model_card(ready: &Ready) -> Value {
    let info = ready.frontend.info();
    json!({
        "id": ready.frontend.served_name(),
        "object": "model",
        "created": 0,
        "owned_by": "chatd",
        "max_model_len": info.context_length,
    })
}

fn health_json(shared: &Shared, ready: &Ready) -> Value {
    let stats = ready.engine.stats().snapshot();
    let memory = memory_use(shared, Some((ready, &stats)));
    json!({
        "status": "ok",
        "model": ready.frontend.served_name(),
        "layout": ready.engine.layout(),
        "provider": ready.engine.provider().to_string(),
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "model_loads": shared.slot.loads.load(Ordering::Relaxed),
        "running": stats.running,
        "queued": stats.queued,
        "kv_pool_bytes": stats.kv_pool_bytes,
        "kv_pool_used_bytes": stats.kv_pool_used_bytes,
        "prefix_cache": {
            "hits": stats.prefix_hits,
            "cached_tokens": stats.prefix_cached_tokens,
            "bytes": stats.prefix_cache_bytes,
        },
        "prefill": {
            "chunk": ready.engine.config().prefill_chunk,
            "longest_run": ready.engine.longest_prefill_run(),
        },
        "decode_steps": stats.decode_steps,
        "decode_tokens": stats.decode_tokens,
        "speculative": {
            "draft_tokens": stats.draft_tokens,
            "accepted_tokens": stats.draft_accepted,
        },
        "memory": {
            "resident_bytes": memory.resident,
            "model_bytes": memory.model,
            "kv_pool_resident_bytes": memory.kv_pool,
            "prefix_cache_bytes": memory.prefix_cache,
            "requests_bytes": memory.requests,
            "other_bytes": memory.other,
            "kv_cache_budget_bytes": ready.budget.kv_cache_bytes,
            "kv_cache_dtype": ready.engine.kv_cache_dtype().to_string(),
            "prefix_cache_budget_bytes": ready.budget.prefix_cache_bytes,
            "budget": ready.budget.reason,
        },
    })
}

/// The Content-Type of a form-encoded body (`curl -d` without `-H`, an HTML form), which is
/// refused rather than parsed as JSON. A missing type or any other is read as JSON: browsers'
/// `fetch` sends a string body as text/plain.
fn form_content_type(request: &Request) -> Option<String> {
    let value = request.headers().iter().find(|h| h.field.equiv("Content-Type"))?.value.as_str();
    let media = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    matches!(media.as_str(), "application/x-www-form-urlencoded" | "multipart/form-data").then(|| value.to_owned())
}

/// Reads the body, refusing anything over the limit without reading it, a body shorter than
/// its declared length, and one that takes longer than `timeout` to arrive.
fn read_body(request: &mut Request, limit: usize, timeout: Duration) -> Result<Vec<u8>, ApiError> {
    let declared = request.body_length();
    if declared.is_some_and(|len| len > limit) {
        return Err(ApiError::too_large(limit));
    }
    let deadline = Instant::now() + timeout;
    let mut body = Vec::new();
    let mut reader = request.as_reader().take(limit as u64 + 1);
    let mut chunk = [0u8; 16 << 10];
    loop {
        match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(ApiError::request_timeout());
            }
            Err(e) => return Err(ApiError::bad_json(format!("could not read the request body: {e}"))),
        }
        if body.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        if Instant::now() > deadline {
            return Err(ApiError::request_timeout());
        }
    }
    if let Some(len) = declared
        && body.len() < len
    {
        return Err(ApiError::bad_json(format!(
            "the request body ended after {} of its {len} bytes (Content-Length)",
            body.len()
        )));
    }
    Ok(body)
}

/// Answers a JSON request that needs the model, with `answer`, once the model is ready.
fn with_model(shared: &Shared, request: Request, answer: impl FnOnce(&Ready, Request) -> Outcome) -> Outcome {
    if let Some(form) = form_content_type(&request) {
        return respond_error(request, &ApiError::unsupported_media_type(&form));
    }
    // Counted before it takes the model, so the model cannot be put to sleep under it.
    shared.in_flight.fetch_add(1, Ordering::SeqCst);
    let outcome = match shared.slot.acquire() {
        Ok(ready) => answer(&ready, request),
        Err(e) => respond_error(request, &unavailable(e)),
    };
    shared.slot.release();
    Outcome { in_flight: true, ..outcome }
}

/// `/tokenize`, `/detokenize`, `/apply-template`: the model's tokenizer and template alone.
fn text_tool(config: &ServerConfig, ready: &Ready, held: &AtomicUsize, mut request: Request, route: Route) -> Outcome {
    let body = match read_body(&mut request, config.max_body_bytes, config.idle_timeout) {
        Ok(body) => body,
        Err(e) => return respond_error(request, &e),
    };
    let _held = Held::new(held, body.capacity());
    let frontend = &ready.frontend;
    let answer = match route {
        Route::Tokenize => frontend.tokenize(&body),
        Route::Detokenize => frontend.detokenize(&body),
        _ => frontend.apply_template(&body),
    };
    match answer {
        Ok(value) => respond_json(request, 200, &value),
        Err(e) => respond_error(request, &e),
    }
}

fn generate(
    config: &ServerConfig,
    ready: &Ready,
    held: &AtomicUsize,
    mut request: Request,
    endpoint: Endpoint,
) -> Outcome {
    let body = match read_body(&mut request, config.max_body_bytes, config.idle_timeout) {
        Ok(body) => body,
        Err(e) => return respond_error(request, &e),
    };
    let _held = Held::new(held, body.capacity());
    let frontend = &ready.frontend;
    let parsed = match frontend.parse(endpoint, &body) {
        Ok(p) => p,
        Err(e) => return respond_error(request, &e),
    };
    if config.log_prompts {
        log::debug!("prompt: {}", frontend.tokenizer().decode(&parsed.generate.prompt).unwrap_or_default());
    }
    let handle = match frontend.submit(&ready.engine, &parsed) {
        Ok(h) => h,
        Err(e) => return respond_error(request, &e),
    };
    let client = Client::new(request.connection_fd(), if parsed.stream { STREAM_POLL } else { ANSWER_POLL });
    let tokenizer = frontend.tokenizer();
    let gone = |usage: Option<Usage>| Outcome {
        status: 499,
        usage,
        timings: None,
        note: Some("client disconnected".into()),
        in_flight: false,
    };
    // The client closed its side before any answer (it may only have half-closed and still
    // read): the request is cancelled, and it is told so.
    let gone_early = |request: Request| {
        let error = ApiError::client_closed();
        respond_error(request, &error);
        gone(None)
    };
    if !parsed.stream {
        let mut collector = Collector::new(&parsed);
        let ended = follow(
            || next_event(&handle, &client, || true),
            |event| {
                collector.add(event);
                Ok(())
            },
        );
        return match ended {
            Ended::Done { usage, timings } => {
                let body = collector.finish(&usage, tokenizer);
                let mut outcome = respond_json(request, 200, &body);
                outcome.usage = Some(usage);
                outcome.timings = Some(timings);
                outcome
            }
            Ended::Failed(error) => respond_error(request, &error),
            Ended::Stopped(Gone) => gone_early(request),
        };
    }
    let mut encoder = StreamEncoder::new(&parsed);
    let stream = std::cell::RefCell::new(Stream::new(request));
    let keep_alive = config.sse_keepalive;
    let ended = follow(
        // Before the stream starts there is nothing to keep alive.
        || {
            next_event(&handle, &client, || match (keep_alive, stream.borrow_mut().sse.as_mut()) {
                (Some(every), Some(sse)) => sse.keep_alive(every).is_ok(),
                _ => true,
            })
        },
        |event| {
            let mut stream = stream.borrow_mut();
            let sse = stream.started(&mut encoder, &parsed, frontend)?;
            for chunk in encoder.encode(&event, tokenizer) {
                // Checking first catches a closed connection one token earlier than the write
                // error would.
                if client.gone() || sse.event(&chunk).is_err() {
                    return Err(Gone);
                }
            }
            Ok(())
        },
    );
    let mut stream = stream.into_inner();
    match ended {
        // Nothing was sent: the request, refused while queued or failed, gets its own status
        // (429, 504, 500) rather than an error inside a 200 stream.
        Ended::Failed(error) if stream.sse.is_none() => match stream.request.take() {
            Some(request) => respond_error(request, &error),
            None => gone(None),
        },
        Ended::Stopped(Gone) if stream.sse.is_none() => stream.request.take().map_or_else(|| gone(None), gone_early),
        Ended::Stopped(Gone) => gone(None),
        Ended::Failed(error) => {
            if let Ok(sse) = stream.started(&mut encoder, &parsed, frontend) {
                let _ = sse.event(&error.to_json().to_string());
            }
            stream.finish();
            Outcome { status: error.status(), note: Some(error.message), ..Outcome::default() }
        }
        Ended::Done { usage, timings } => {
            let Ok(sse) = stream.started(&mut encoder, &parsed, frontend) else { return gone(Some(usage)) };
            if let Some(chunk) = encoder.usage(&usage)
                && sse.event(&chunk).is_err()
            {
                return gone(Some(usage));
            }
            stream.finish();
            Outcome { status: 200, usage: Some(usage), timings: Some(timings), ..Outcome::default() }
        }
    }
}

/// A streamed answer: nothing is sent before the request's first event (`Started` once it
/// leaves the queue), so that a request refused while queued still gets its own status; the
/// stream starts then, and keep-alives cover its prompt's reading.
struct Stream {
    /// The request, until the stream starts.
    request: Option<Request>,
    sse: Option<SseWriter>,
}

impl Stream {
    fn new(request: Request) -> Self {
        Self { request: Some(request), sse: None }
    }

    /// The stream, started (head and first chunks sent) if it was not yet.
    fn started(
        &mut self,
        encoder: &mut StreamEncoder,
        parsed: &ParsedRequest,
        frontend: &Frontend,
    ) -> Result<&mut SseWriter, Gone> {
        if self.sse.is_none() {
            let request = self.request.take().ok_or(Gone)?;
            let cors: String = cors_headers().iter().map(|(name, value)| format!("{name}: {value}\r\n")).collect();
            let mut sse = SseWriter::start(request, &cors).map_err(|_| Gone)?;
            for chunk in encoder.start(parsed, frontend.tokenizer()) {
                sse.event(&chunk).map_err(|_| Gone)?;
            }
            self.sse = Some(sse);
        }
        self.sse.as_mut().ok_or(Gone)
    }

    fn finish(self) {
        if let Some(sse) = self.sse {
            let _ = sse.finish();
        }
    }
}

/// Counts bytes in `counter` while alive (a request body, for the memory accounting).
struct Held<'a> {
    counter: &'a AtomicUsize,
    bytes: usize,
}

impl<'a> Held<'a> {
    fn new(counter: &'a AtomicUsize, bytes: usize) -> Self {
        counter.fetch_add(bytes, Ordering::Relaxed);
        Self { counter, bytes }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Where the resident memory is: what the settings bound (KV pool, prefix cache), what the
/// model took to load, what requests hold now, and the rest.
pub(crate) struct MemoryUse {
    pub resident: usize,
    pub model: usize,
    /// The part of the KV pool in memory (its allocation, bounded by `kv_cache_mb`, is
    /// `kv_pool_bytes`; positions never written take none).
    pub kv_pool: usize,
    pub prefix_cache: usize,
    pub requests: usize,
    pub other: usize,
}

/// With the model loaded: its `Ready` and the engine's counts at the same moment.
pub(super) fn memory_use(shared: &Shared, ready: Option<(&Ready, &StatsSnapshot)>) -> MemoryUse {
    let resident = crate::memory::resident_bytes();
    let model = ready.map_or(0, |(r, _)| r.model_bytes);
    let stats = ready.map(|(_, s)| *s).unwrap_or_default();
    let kv_pool = stats.kv_pool_resident_bytes;
    let prefix_cache = stats.prefix_cache_bytes;
    let requests = shared.body_bytes.load(Ordering::Relaxed) + stats.sequence_bytes;
    let other = resident.saturating_sub(model + kv_pool + prefix_cache + requests);
    MemoryUse { resident, model, kv_pool, prefix_cache, requests, other }
}

/// How often a handler streaming an answer checks that its client is still there (and whether
/// a keep-alive comment is due).
const STREAM_POLL: Duration = Duration::from_millis(20);

/// How often a handler waiting for a whole answer checks its client: the engine sends such an
/// answer's events only when it ends (`GenerateRequest::incremental`), so these are the
/// handler's only wake-ups meanwhile, and a client gone costs at most this much more work.
const ANSWER_POLL: Duration = Duration::from_millis(200);

/// The client closed its connection.
struct Gone;

/// The request's next event (`None`: the engine dropped it without a last event), watching the
/// client's connection meanwhile (at least every `client.every`, also while events keep coming);
/// while none comes, `idle` runs every `client.every` (false: the client is gone).
fn next_event(handle: &RequestHandle, client: &Client, mut idle: impl FnMut() -> bool) -> Result<Option<Event>, Gone> {
    loop {
        if client.due() && client.gone() {
            return Err(Gone);
        }
        match handle.recv_timeout(client.every) {
            Ok(event) => return Ok(Some(event)),
            Err(RecvTimeoutError::Timeout) if !idle() => return Err(Gone),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(None),
        }
    }
}

/// The client's end of the connection.
struct Client {
    fd: Option<std::os::unix::io::RawFd>,
    /// How often to look at it.
    every: Duration,
    last_check: std::cell::Cell<Instant>,
}

impl Client {
    fn new(fd: Option<std::os::unix::io::RawFd>, every: Duration) -> Self {
        Self { fd, every, last_check: std::cell::Cell::new(Instant::now()) }
    }

    /// Whether `every` has passed since the last look at the connection.
    fn due(&self) -> bool {
        let now = Instant::now();
        if now - self.last_check.get() < self.every {
            return false;
        }
        self.last_check.set(now);
        true
    }

    /// Whether the client has closed the connection. TCP's state says so (CLOSE_WAIT after the
    /// client's FIN); reading cannot, since tiny_http shuts down its read side itself once it
    /// expects no further request on the connection.
    fn gone(&self) -> bool {
        let Some(fd) = self.fd else { return false };
        // SAFETY: tcp_info is plain data, valid when zeroed.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: the fd stays open while the request (or its writer) is alive, which outlives
        // every call; `info` and `len` are valid for writes of the sizes given.
        let rc = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len) };
        // TCP_CLOSE_WAIT = 8, TCP_CLOSE = 7 (linux/tcp.h): the peer has closed.
        rc == 0 && matches!(info.tcpi_state, 7 | 8)
    }
}

fn respond_metrics(shared: &Shared, request: Request) -> Outcome {
    let read = |v: &std::sync::atomic::AtomicUsize| v.load(std::sync::atomic::Ordering::Relaxed);
    let ready = shared.slot.current().1;
    let ready = ready.as_deref();
    let engine = ready.map(|r| r.engine.stats().snapshot()).unwrap_or_default();
    let gauges = Gauges {
        engine,
        connections_open: shared.connections.open_connections(),
        connections_refused: shared.connections.refused_connections(),
        protocol_errors: shared.connections.rejected_heads(),
        in_flight: read(&shared.in_flight),
        uptime: shared.started.elapsed(),
        memory: memory_use(shared, ready.map(|r| (r, &engine))),
        model_loaded: ready.is_some(),
        model_loads: shared.slot.loads.load(Ordering::Relaxed),
    };
    let model = ready.map_or(String::new(), |r| r.frontend.served_name().to_owned());
    let layout = ready.map_or("", |r| r.engine.layout());
    let provider = ready.map_or(String::new(), |r| r.engine.provider().to_string());
    let info = [
        ("version", env!("CARGO_PKG_VERSION")),
        ("model", model.as_str()),
        ("layout", layout),
        ("provider", provider.as_str()),
    ];
    let text = shared.metrics.render(&info, &gauges);
    let mut response = Response::from_string(text).with_header(
        Header::from_bytes(&b"Content-Type"[..], &b"text/plain; version=0.0.4; charset=utf-8"[..])
            .expect("static header"),
    );
    add_headers(&mut response, &[]);
    let _ = request.respond(response);
    Outcome::status(200)
}

/// The origin to allow for `request`: its `Origin` header, when `origins` lists it or `*`.
fn allowed_origin(origins: &[String], request: &Request) -> Option<String> {
    let origin = request.headers().iter().find(|h| h.field.equiv("Origin"))?.value.as_str();
    origins.iter().any(|o| o == "*" || o == origin).then(|| origin.to_owned())
}

/// The CORS headers every response to an allowed origin carries.
fn cors_headers() -> Vec<(&'static str, String)> {
    CORS_ORIGIN.with(|o| match &*o.borrow() {
        Some(origin) => vec![("Access-Control-Allow-Origin", origin.clone()), ("Vary", "Origin".to_owned())],
        None => Vec::new(),
    })
}

/// 204 to a CORS preflight: the route's method, the headers the page asked to send.
fn respond_preflight(request: Request, route: Route) -> Outcome {
    let asked = request.headers().iter().find(|h| h.field.equiv("Access-Control-Request-Headers"));
    let headers = asked.map_or("Authorization, Content-Type".to_owned(), |h| h.value.as_str().to_owned());
    let methods = format!("{}, OPTIONS", route.method());
    let mut response = Response::empty(204);
    add_headers(
        &mut response,
        &[
            ("Access-Control-Allow-Methods", methods.as_str()),
            ("Access-Control-Allow-Headers", headers.as_str()),
            ("Access-Control-Max-Age", "600"),
        ],
    );
    let _ = request.respond(response);
    Outcome::status(204)
}

/// Adds `headers`, and the CORS headers of the request being answered, to `response`.
fn add_headers<R: Read>(response: &mut Response<R>, headers: &[(&str, &str)]) {
    let cors = cors_headers();
    for (name, value) in headers.iter().copied().chain(cors.iter().map(|(n, v)| (*n, v.as_str()))) {
        if let Ok(h) = Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response.add_header(h);
        }
    }
}

fn respond_error(request: Request, error: &ApiError) -> Outcome {
    let extra: &[(&str, &str)] = if error.status() == 429 { &[("Retry-After", "1")] } else { &[] };
    let mut outcome = respond_with(request, error.status(), &error.to_json(), extra);
    outcome.note = Some(error.message.clone());
    outcome
}

fn respond_json(request: Request, status: u16, body: &Value) -> Outcome {
    respond_with(request, status, body, &[])
}

fn respond_with(request: Request, status: u16, body: &Value, headers: &[(&str, &str)]) -> Outcome {
    let mut response = Response::from_string(body.to_string())
        .with_status_code(status)
        .with_header(Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]).expect("static header"));
    add_headers(&mut response, headers);
    let _ = request.respond(response);
    Outcome::status(status)
}
