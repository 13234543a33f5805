use std::io::Read;
use std::time::Instant;

use serde_json::{Value, json};
use tiny_http::{Header, Method, Request, Response};

use super::Shared;
use super::sse::SseWriter;
use crate::api::{ApiError, Collector, Endpoint, StreamEncoder};
use crate::engine::{Event, Timings, Usage};

/// What one request did, for its log line.
#[derive(Default)]
struct Outcome {
    status: u16,
    usage: Option<Usage>,
    timings: Option<Timings>,
    note: Option<String>,
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
    let outcome = route(shared, request, &method, &path);
    let mut line = format!("{method} {path} {} {:.1}ms", outcome.status, started.elapsed().as_secs_f64() * 1e3);
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
    let allowed = match path {
        "/v1/chat/completions" | "/v1/completions" => "POST",
        "/v1/models" | "/health" => "GET",
        p if p.starts_with("/v1/models/") => "GET",
        _ => return respond_error(request, &ApiError::not_found(path)),
    };
    if method.as_str() != allowed {
        let err = ApiError::method_not_allowed(method.as_str(), path, allowed);
        let mut outcome = respond_with(request, err.status, &err.to_json(), &[("Allow", allowed)]);
        outcome.note = Some(err.message);
        return outcome;
    }
    match path {
        "/v1/chat/completions" => generate(shared, request, Endpoint::Chat),
        "/v1/completions" => generate(shared, request, Endpoint::Completion),
        "/v1/models" => respond_json(request, 200, &json!({"object": "list", "data": [model_json(shared)]})),
        "/health" => respond_json(request, 200, &health_json(shared)),
        _ => {
            let id = &path["/v1/models/".len()..];
            if id == shared.frontend.served_name() {
                respond_json(request, 200, &model_json(shared))
            } else {
                respond_error(request, &ApiError::model_not_found(id))
            }
        }
    }
}

fn model_json(shared: &Shared) -> Value {
    let info = shared.frontend.info();
    json!({
        "id": shared.frontend.served_name(),
        "object": "model",
        "created": 0,
        "owned_by": "chatd",
        "max_model_len": info.context_length,
    })
}

fn health_json(shared: &Shared) -> Value {
    let stats = shared.engine.stats();
    let read = |v: &std::sync::atomic::AtomicUsize| v.load(std::sync::atomic::Ordering::Relaxed);
    json!({
        "status": "ok",
        "model": shared.frontend.served_name(),
        "layout": shared.engine.layout(),
        "provider": "cpu",
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "running": read(&stats.running),
        "queued": read(&stats.queued),
        "kv_pool_bytes": read(&stats.kv_pool_bytes),
        "prefix_cache": {
            "hits": read(&stats.prefix_hits),
            "cached_tokens": read(&stats.prefix_cached_tokens),
            "bytes": read(&stats.prefix_cache_bytes),
        },
        "decode_steps": read(&stats.decode_steps),
        "decode_tokens": read(&stats.decode_tokens),
    })
}

/// Reads the body, refusing anything over the limit without reading it.
fn read_body(request: &mut Request, limit: usize) -> Result<Vec<u8>, ApiError> {
    if request.body_length().is_some_and(|len| len > limit) {
        return Err(ApiError::too_large(limit));
    }
    let mut body = Vec::new();
    request
        .as_reader()
        .take(limit as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::bad_json(format!("could not read the request body: {e}")))?;
    if body.len() > limit {
        return Err(ApiError::too_large(limit));
    }
    Ok(body)
}

fn generate(shared: &Shared, mut request: Request, endpoint: Endpoint) -> Outcome {
    let body = match read_body(&mut request, shared.config.max_body_bytes) {
        Ok(body) => body,
        Err(e) => return respond_error(request, &e),
    };
    let frontend = &shared.frontend;
    let parsed = match frontend.parse(endpoint, &body) {
        Ok(p) => p,
        Err(e) => return respond_error(request, &e),
    };
    let handle = match frontend.submit(&shared.engine, &parsed) {
        Ok(h) => h,
        Err(e) => return respond_error(request, &e),
    };
    let tokenizer = frontend.tokenizer();
    if !parsed.stream {
        let mut collector = Collector::new(&parsed);
        loop {
            match handle.recv() {
                Some(Event::Done { usage, timings }) => {
                    let body = collector.finish(&usage, tokenizer);
                    let mut outcome = respond_json(request, 200, &body);
                    outcome.usage = Some(usage);
                    outcome.timings = Some(timings);
                    return outcome;
                }
                Some(Event::Error(message)) => {
                    return respond_error(request, &ApiError::internal(message));
                }
                Some(event) => collector.add(event),
                None => {
                    return respond_error(request, &ApiError::internal("the engine dropped the request"));
                }
            }
        }
    }
    let mut encoder = StreamEncoder::new(&parsed);
    let mut sse = match SseWriter::start(request) {
        Ok(w) => w,
        Err(_) => {
            return Outcome { status: 200, note: Some("client disconnected".into()), ..Outcome::default() };
        }
    };
    let gone =
        |usage, timings| Outcome { status: 200, usage, timings, note: Some("client disconnected mid-stream".into()) };
    for chunk in encoder.start() {
        if sse.event(&chunk).is_err() {
            return gone(None, None);
        }
    }
    loop {
        let event = match handle.recv() {
            Some(e) => e,
            None => {
                let _ = sse.event(&ApiError::internal("the engine dropped the request").to_json().to_string());
                let _ = sse.finish();
                return Outcome { status: 500, note: Some("engine dropped the request".into()), ..Outcome::default() };
            }
        };
        match &event {
            Event::Done { usage, timings } => {
                if let Some(chunk) = encoder.usage(usage) {
                    if sse.event(&chunk).is_err() {
                        return gone(Some(*usage), Some(*timings));
                    }
                }
                let _ = sse.finish();
                return Outcome { status: 200, usage: Some(*usage), timings: Some(*timings), note: None };
            }
            Event::Error(message) => {
                let _ = sse.event(&ApiError::internal(message.clone()).to_json().to_string());
                let _ = sse.finish();
                return Outcome { status: 500, note: Some(message.clone()), ..Outcome::default() };
            }
            _ => {
                if let Some(chunk) = encoder.encode(&event, tokenizer) {
                    if sse.event(&chunk).is_err() {
                        // Dropping the handle cancels the request; the engine frees it next step.
                        return gone(None, None);
                    }
                }
            }
        }
    }
}

fn respond_error(request: Request, error: &ApiError) -> Outcome {
    let extra: &[(&str, &str)] = if error.status == 429 { &[("Retry-After", "1")] } else { &[] };
    let mut outcome = respond_with(request, error.status, &error.to_json(), extra);
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
    for (name, value) in headers {
        if let Ok(h) = Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response.add_header(h);
        }
    }
    let _ = request.respond(response);
    Outcome::status(status)
}
