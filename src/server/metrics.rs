//! Counters and histograms for `GET /metrics`, written in the Prometheus text format
//! (version 0.0.4). Every request the handlers see is counted once, by endpoint and status.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::engine::{Timings, Usage};

/// Upper bounds, in seconds, of the latency histograms' buckets.
const LATENCY_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
const TOKEN_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0];

struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), plus the overflow bucket.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0 }
    }

    fn observe(&mut self, seconds: f64) {
        let i = self.bounds.iter().position(|&b| seconds <= b).unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += seconds;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i];
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[self.bounds.len()];
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}");
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

struct Recorded {
    /// (endpoint, status) -> requests.
    requests: BTreeMap<(&'static str, u16), u64>,
    /// endpoint -> request latency.
    latency: BTreeMap<&'static str, Histogram>,
    time_to_first_token: Histogram,
    time_per_output_token: Histogram,
}

pub(crate) struct Metrics {
    recorded: Mutex<Recorded>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    cached_prompt_tokens: AtomicU64,
    /// Model load time in ms, once loaded.
    pub model_load_ms: AtomicU64,
}

/// Live values read at scrape time from the engine and the connection layer.
pub(crate) struct Gauges {
    /// The engine's counts (all zero while no model is loaded).
    pub engine: crate::engine::StatsSnapshot,
    pub connections_open: usize,
    /// Whether the model is loaded (not loading, asleep or waking).
    pub model_loaded: bool,
    /// Models loaded since start, the first included.
    pub model_loads: usize,
    pub connections_refused: usize,
    pub protocol_errors: usize,
    pub in_flight: usize,
    pub uptime: Duration,
    pub memory: super::routes::MemoryUse,
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            recorded: Mutex::new(Recorded {
                requests: BTreeMap::new(),
                latency: BTreeMap::new(),
                time_to_first_token: Histogram::new(LATENCY_BUCKETS),
                time_per_output_token: Histogram::new(TOKEN_BUCKETS),
            }),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            cached_prompt_tokens: AtomicU64::new(0),
            model_load_ms: AtomicU64::new(0),
        }
    }

    /// Counts one finished request.
    pub fn record(
        &self,
        endpoint: &'static str,
        status: u16,
        elapsed: Duration,
        usage: Option<Usage>,
        timings: Option<Timings>,
    ) {
        if let Some(u) = usage {
            self.prompt_tokens.fetch_add(u.prompt_tokens as u64, Ordering::Relaxed);
            self.completion_tokens.fetch_add(u.completion_tokens as u64, Ordering::Relaxed);
            self.cached_prompt_tokens.fetch_add(u.cached_tokens as u64, Ordering::Relaxed);
        }
        let mut r = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        *r.requests.entry((endpoint, status)).or_default() += 1;
        r.latency.entry(endpoint).or_insert_with(|| Histogram::new(LATENCY_BUCKETS)).observe(elapsed.as_secs_f64());
        if let (Some(t), Some(u)) = (timings, usage)
            && u.completion_tokens > 0
        {
            r.time_to_first_token.observe(t.time_to_first_token.as_secs_f64());
            if u.completion_tokens > 1 && t.total > t.time_to_first_token {
                let per_token = (t.total - t.time_to_first_token).as_secs_f64() / (u.completion_tokens - 1) as f64;
                r.time_per_output_token.observe(per_token);
            }
        }
    }

    /// The whole exposition.
    pub fn render(&self, info: &[(&str, &str)], gauges: &Gauges) -> String {
        let mut out = String::with_capacity(8192);
        let labels: Vec<String> = info.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
        family(&mut out, "chatd_build_info", "gauge", "Version and model of this chatd; always 1.");
        let _ = writeln!(out, "chatd_build_info{{{}}} 1", labels.join(","));
        let load = self.model_load_ms.load(Ordering::Relaxed) as f64 / 1e3;
        gauge(&mut out, "chatd_model_load_seconds", "Time the model took to load, the last time.", load);
        let loaded = f64::from(u8::from(gauges.model_loaded));
        gauge(&mut out, "chatd_model_loaded", "1 while the model is loaded; 0 while it loads or sleeps.", loaded);
        counter(
            &mut out,
            "chatd_model_loads_total",
            "Model loads, the first and each wake.",
            gauges.model_loads as f64,
        );
        gauge(&mut out, "chatd_uptime_seconds", "Time since chatd started.", gauges.uptime.as_secs_f64());

        let r = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        family(&mut out, "chatd_requests_total", "counter", "HTTP requests answered, by endpoint and status.");
        for ((endpoint, status), n) in &r.requests {
            let _ = writeln!(out, "chatd_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
        }
        family(&mut out, "chatd_request_duration_seconds", "histogram", "Time from request to the last byte answered.");
        for (endpoint, h) in &r.latency {
            h.write(&mut out, "chatd_request_duration_seconds", &format!("endpoint=\"{endpoint}\""));
        }
        family(&mut out, "chatd_time_to_first_token_seconds", "histogram", "Time from submission to the first token.");
        r.time_to_first_token.write(&mut out, "chatd_time_to_first_token_seconds", "");
        family(&mut out, "chatd_time_per_output_token_seconds", "histogram", "Mean time per token after the first.");
        r.time_per_output_token.write(&mut out, "chatd_time_per_output_token_seconds", "");
        drop(r);

        let read = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        counter(
            &mut out,
            "chatd_prompt_tokens_total",
            "Prompt tokens of answered requests.",
            read(&self.prompt_tokens),
        );
        counter(&mut out, "chatd_completion_tokens_total", "Tokens generated.", read(&self.completion_tokens));
        counter(
            &mut out,
            "chatd_prompt_cached_tokens_total",
            "Prompt tokens reused from the prefix cache.",
            read(&self.cached_prompt_tokens),
        );
        gauge(&mut out, "chatd_requests_running", "Sequences generating now.", gauges.engine.running as f64);
        gauge(&mut out, "chatd_requests_queued", "Requests waiting for a place.", gauges.engine.queued as f64);
        gauge(&mut out, "chatd_requests_in_flight", "Generation requests being answered.", gauges.in_flight as f64);
        gauge(
            &mut out,
            "chatd_kv_cache_bytes",
            "Bytes of the shared KV cache pool.",
            gauges.engine.kv_pool_bytes as f64,
        );
        let m = &gauges.memory;
        gauge(&mut out, "chatd_memory_resident_bytes", "The process's resident size.", m.resident as f64);
        gauge(&mut out, "chatd_memory_model_bytes", "Resident size the model took to load.", m.model as f64);
        gauge(&mut out, "chatd_memory_kv_pool_bytes", "Resident part of the KV cache pool.", m.kv_pool as f64);
        gauge(&mut out, "chatd_memory_requests_bytes", "Bytes request bodies and sequences hold.", m.requests as f64);
        gauge(
            &mut out,
            "chatd_memory_other_bytes",
            "Resident size not in the model, KV pool, prefix cache or requests.",
            m.other as f64,
        );
        gauge(
            &mut out,
            "chatd_kv_cache_used_bytes",
            "Bytes of the KV pool held by sequences.",
            gauges.engine.kv_pool_used_bytes as f64,
        );
        counter(
            &mut out,
            "chatd_prefix_cache_hits_total",
            "Requests that reused a cached prefix.",
            gauges.engine.prefix_hits as f64,
        );
        counter(
            &mut out,
            "chatd_prefix_cache_tokens_total",
            "Prompt tokens not recomputed thanks to the prefix cache.",
            gauges.engine.prefix_cached_tokens as f64,
        );
        gauge(
            &mut out,
            "chatd_prefix_cache_bytes",
            "Bytes held by the prefix cache.",
            gauges.engine.prefix_cache_bytes as f64,
        );
        counter(&mut out, "chatd_decode_steps_total", "Batched decode steps run.", gauges.engine.decode_steps as f64);
        counter(
            &mut out,
            "chatd_decode_tokens_total",
            "Tokens produced by decode steps.",
            gauges.engine.decode_tokens as f64,
        );
        counter(
            &mut out,
            "chatd_speculative_draft_tokens_total",
            "Draft tokens checked by speculative decode steps.",
            gauges.engine.draft_tokens as f64,
        );
        counter(
            &mut out,
            "chatd_speculative_accepted_tokens_total",
            "Draft tokens accepted by speculative decode steps.",
            gauges.engine.draft_accepted as f64,
        );
        gauge(&mut out, "chatd_connections_open", "HTTP connections being read.", gauges.connections_open as f64);
        counter(
            &mut out,
            "chatd_connections_refused_total",
            "Connections refused with 503 for being over max_connections.",
            gauges.connections_refused as f64,
        );
        counter(
            &mut out,
            "chatd_http_protocol_errors_total",
            "Requests refused before routing: malformed, oversize or slow heads (400, 408, 431, 505).",
            gauges.protocol_errors as f64,
        );
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: f64) {
    family(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

fn counter(out: &mut String, name: &str, help: &str, value: f64) {
    family(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_counted() {
        let m = Metrics::new();
        let timings = Timings {
            time_to_first_token: Duration::from_millis(30),
            total: Duration::from_millis(130),
            ..Timings::default()
        };
        let usage = Usage { prompt_tokens: 5, completion_tokens: 11, cached_tokens: 2 };
        m.record("/v1/chat/completions", 200, Duration::from_millis(140), Some(usage), Some(timings));
        m.record("/v1/chat/completions", 400, Duration::from_millis(1), None, None);
        let gauges = Gauges {
            engine: crate::engine::StatsSnapshot::default(),
            connections_open: 0,
            connections_refused: 0,
            protocol_errors: 0,
            in_flight: 0,
            uptime: Duration::ZERO,
            model_loaded: true,
            model_loads: 1,
            memory: super::super::routes::MemoryUse {
                resident: 100,
                model: 40,
                kv_pool: 0,
                prefix_cache: 0,
                requests: 10,
                other: 50,
            },
        };
        let text = m.render(&[("version", "0.1.0"), ("model", "m\"x")], &gauges);
        assert!(text.contains("chatd_build_info{version=\"0.1.0\",model=\"m\\\"x\"} 1"), "{text}");
        assert!(text.contains("chatd_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 1"));
        assert!(text.contains("chatd_requests_total{endpoint=\"/v1/chat/completions\",status=\"400\"} 1"));
        assert!(text.contains("chatd_request_duration_seconds_count{endpoint=\"/v1/chat/completions\"} 2"));
        assert!(text.contains("chatd_time_to_first_token_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("chatd_time_to_first_token_seconds_bucket{le=\"0.025\"} 0"));
        // (130 - 30) ms over 10 tokens after the first: 10 ms each.
        assert!(text.contains("chatd_time_per_output_token_seconds_bucket{le=\"0.01\"} 1"));
        assert!(text.contains("chatd_completion_tokens_total 11"));
        assert!(text.contains("chatd_prompt_cached_tokens_total 2"));
        assert!(text.contains("chatd_model_loaded 1\n") && text.contains("chatd_model_loads_total 1\n"), "{text}");
    }
}
