//! The daemon's settings: defaults, overridden by a TOML file (`--config`, else
//! `$CHATD_CONFIG`, else /etc/chatd/chatd.toml when it exists), overridden by `CHATD_*`
//! environment variables, overridden by command-line flags. Every bad value fails at startup
//! with where it came from, the setting's name and why. The C ABI reads the same settings
//! from JSON.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api::Limits;
use crate::engine::EngineConfig;
use crate::model::RuntimeOptions;
use crate::server::ServerConfig;

/// Read when neither `--config` nor `$CHATD_CONFIG` names a file, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/chatd/chatd.toml";

#[derive(Clone, Debug)]
pub struct Config {
    pub model: Option<PathBuf>,
    pub served_model_name: Option<String>,
    pub runtime: RuntimeOptions,
    pub server: ServerConfig,
    pub engine: EngineConfig,
    pub limits: Limits,
    /// Whether `kv_cache_mb` and `prefix_cache_mb` were set; else chatd sizes them from the
    /// memory available at start (`service::size_budget`).
    pub kv_cache_set: bool,
    pub prefix_cache_set: bool,
    pub log_level: String,
    /// The configuration file that was read, if any.
    pub file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            model: None,
            served_model_name: None,
            runtime: RuntimeOptions::default(),
            server: ServerConfig::default(),
            engine: EngineConfig::default(),
            limits: Limits::default(),
            kv_cache_set: false,
            prefix_cache_set: false,
            log_level: "info".into(),
            file: None,
        }
    }
}

/// What the command line asks for.
pub enum Command {
    Serve(Box<Config>),
    /// `--check-config`: the settings are valid; report and exit.
    Check(Box<Config>),
    Help,
    Version,
}

/// (flag, environment variable, value name, help)
const SETTINGS: &[(&str, &str, &str, &str)] = &[
    ("model", "CHATD_MODEL", "DIR", "model folder (onnxruntime-genai or Hugging Face Optimum ONNX layout); required"),
    ("listen", "CHATD_LISTEN", "ADDR", "address to serve on [127.0.0.1:8080]"),
    ("threads", "CHATD_THREADS", "N", "ONNX Runtime intra-op threads [2]"),
    ("provider", "CHATD_PROVIDER", "EP", "execution provider: cpu, cuda[:N], tensorrt[:N] (GPU ONNX Runtime) [cpu]"),
    (
        "onnxruntime",
        "CHATD_ONNXRUNTIME",
        "PATH",
        "libonnxruntime.so to load (else ORT_DYLIB_PATH, the setup copy, the system)",
    ),
    ("served-model-name", "CHATD_SERVED_MODEL_NAME", "NAME", "model name clients use [the model folder's name]"),
    ("max-body-bytes", "CHATD_MAX_BODY_BYTES", "N", "largest request body; larger ones get 413 [4194304]"),
    ("log-level", "CHATD_LOG_LEVEL", "LEVEL", "error, warn, info, debug or trace [info]"),
    ("http-threads", "CHATD_HTTP_THREADS", "N", "threads serving HTTP requests (one stream each) [32]"),
    ("max-running", "CHATD_MAX_RUNNING", "N", "sequences generating at once [8]"),
    ("workers", "CHATD_WORKERS", "N", "threads for sampling/detokenizing beside the model; 0 = engine thread [2]"),
    ("max-queued", "CHATD_MAX_QUEUED", "N", "requests waiting for a place before 429s [64]"),
    ("max-queue-wait-s", "CHATD_MAX_QUEUE_WAIT_S", "SECS", "longest wait for a place before a 429 [30]"),
    ("request-timeout-s", "CHATD_REQUEST_TIMEOUT_S", "SECS", "deadline of requests without `timeout` [600]"),
    (
        "prefill-chunk",
        "CHATD_PREFILL_CHUNK",
        "N",
        "prompt tokens per model run; prompts are cut at multiples of it [16]",
    ),
    (
        "stream-slowdown",
        "CHATD_STREAM_SLOWDOWN",
        "X",
        "most slowdown of running streams while a new prompt is fed [2.0]",
    ),
    (
        "speculative-tokens",
        "CHATD_SPECULATIVE_TOKENS",
        "N",
        "draft tokens checked per run while one stream generates alone (genai layout); 0 = off [0]",
    ),
    (
        "kv-cache-mb",
        "CHATD_KV_CACHE_MB",
        "N",
        "most memory for the genai layout's shared KV cache [auto: 2/5 of the memory available after loading, at most 1024]",
    ),
    (
        "kv-cache-dtype",
        "CHATD_KV_CACHE_DTYPE",
        "TYPE",
        "how the genai layout stores keys and values: float32, int8 (a quarter of the memory) or int4 [float32]",
    ),
    (
        "prefix-cache-mb",
        "CHATD_PREFIX_CACHE_MB",
        "N",
        "memory for prompt keys/values reused across requests; 0 = off [auto: 1/10 of the memory available, at most 256]",
    ),
    ("log-prompts", "CHATD_LOG_PROMPTS", "BOOL", "log prompt text (at debug level) [false]"),
    ("max-connections", "CHATD_MAX_CONNECTIONS", "N", "connections served at once; more get 503 [128]"),
    (
        "idle-timeout-s",
        "CHATD_IDLE_TIMEOUT_S",
        "SECS",
        "close connections silent this long, in or between requests [30]",
    ),
    ("max-header-bytes", "CHATD_MAX_HEADER_BYTES", "N", "largest request line + headers; larger get 431 [8192]"),
    ("max-messages", "CHATD_MAX_MESSAGES", "N", "most messages in a chat request [256]"),
    ("max-prompt-tokens", "CHATD_MAX_PROMPT_TOKENS", "N", "most prompt tokens; 0 = the model's context [0]"),
    ("max-completion-tokens", "CHATD_MAX_COMPLETION_TOKENS", "N", "largest max_tokens; 0 = the model's context [0]"),
    ("max-n", "CHATD_MAX_N", "N", "most choices (n) per request [8]"),
    ("max-stop-strings", "CHATD_MAX_STOP_STRINGS", "N", "most stop strings per request [16]"),
    ("max-stop-length", "CHATD_MAX_STOP_LENGTH", "N", "longest stop string in bytes [256]"),
    (
        "max-constraint-bytes",
        "CHATD_MAX_CONSTRAINT_BYTES",
        "N",
        "longest regex, grammar or JSON schema (tools' included) in bytes, at most 65536 [32768]",
    ),
    (
        "shutdown-timeout-s",
        "CHATD_SHUTDOWN_TIMEOUT_S",
        "SECS",
        "on SIGTERM, time in-flight requests get to finish [30]",
    ),
    (
        "idle-unload-s",
        "CHATD_IDLE_UNLOAD_S",
        "SECS",
        "release the model after this long without requests, load it again for the next; 0 = never [0]",
    ),
    ("api-keys-file", "CHATD_API_KEYS_FILE", "PATH", "file of accepted API keys, one per line; unset = no keys"),
    ("auth-health", "CHATD_AUTH_HEALTH", "BOOL", "whether /health needs an API key too [false]"),
    ("auth-metrics", "CHATD_AUTH_METRICS", "BOOL", "whether /metrics needs an API key too [false]"),
    (
        "sse-keepalive-s",
        "CHATD_SSE_KEEPALIVE_S",
        "SECS",
        "a comment line on a stream that has sent nothing for this long (a long prompt); 0 = never [15]",
    ),
    (
        "cors-origins",
        "CHATD_CORS_ORIGINS",
        "LIST",
        "web origins (https://app.local,...) browsers may call the API from, or *; empty = no CORS [empty]",
    ),
];

pub fn usage() -> String {
    let mut out = String::from(
        "chatd: an OpenAI-compatible chat server for ONNX models\n\nUsage: chatd --model DIR [options]\n\nOptions (each also read from its environment variable; flags win):\n",
    );
    for (flag, env, value, help) in SETTINGS {
        out += &format!("  {:<26} {help}\n  {:<26} ${env}\n", format!("--{flag} {value}"), "");
    }
    out += &format!(
        "  {:<26} TOML file of these settings (keys as the flags, `_` for `-`) [$CHATD_CONFIG, else {DEFAULT_CONFIG_FILE} if present]\n",
        "--config PATH"
    );
    out += &format!("  {:<26} check the settings and the model folder, then exit\n", "--check-config");
    out += &format!("  {:<26} this text\n  {:<26} print the version\n", "--help", "--version");
    out
}

impl Config {
    /// Reads the configuration file, the environment, then `args` (without the program name).
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Command, String> {
        let mut flags = Vec::new();
        let mut file = None;
        let mut check = false;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-h" | "--help" => return Ok(Command::Help),
                "-V" | "--version" => return Ok(Command::Version),
                "--check-config" => {
                    check = true;
                    continue;
                }
                _ => {}
            }
            let Some(flag) = arg.strip_prefix("--") else {
                return Err(format!("unexpected argument {arg:?}; see --help"));
            };
            let (name, value) = match flag.split_once('=') {
                Some((name, value)) => (name.to_owned(), value.to_owned()),
                None => {
                    let value = args.next().ok_or_else(|| format!("--{flag} needs a value"))?;
                    (flag.to_owned(), value)
                }
            };
            if name == "config" {
                file = Some(PathBuf::from(value));
            } else if SETTINGS.iter().any(|s| s.0 == name) {
                flags.push((name, value));
            } else {
                return Err(format!("unknown option --{name}; see --help"));
            }
        }
        let mut config = Config::default();
        match file.or_else(|| env("CHATD_CONFIG").filter(|v| !v.is_empty()).map(PathBuf::from)) {
            Some(path) => config.read_file(&path)?,
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => config.read_file(Path::new(DEFAULT_CONFIG_FILE))?,
            None => {}
        }
        for (flag, var, _, _) in SETTINGS {
            if let Some(value) = env(var).filter(|v| !v.is_empty()) {
                config.set(flag, &value).map_err(|e| format!("${var}: {e}"))?;
            }
        }
        for (name, value) in flags {
            config.set(&name, &value).map_err(|e| format!("--{name}: {e}"))?;
        }
        Ok(if check { Command::Check(Box::new(config)) } else { Command::Serve(Box::new(config)) })
    }

    /// Applies a TOML file of settings: top-level keys named as the flags.
    fn read_file(&mut self, path: &Path) -> Result<(), String> {
        let shown = path.display();
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read the configuration {shown}: {e}"))?;
        let table: toml::Table =
            text.parse().map_err(|e: toml::de::Error| format!("{shown}: {}", e.to_string().trim()))?;
        for (key, value) in &table {
            let text = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(format!("{shown}: `{key}`: {} is not a string, number or boolean", other.type_str()));
                }
            };
            self.set_named(key, &text).map_err(|e| format!("{shown}: `{key}`: {e}"))?;
        }
        self.file = Some(path.to_path_buf());
        Ok(())
    }

    /// Sets a setting named as in a file or JSON (`max_running` or `max-running`).
    fn set_named(&mut self, key: &str, value: &str) -> Result<(), String> {
        let name = key.replace('_', "-");
        if !SETTINGS.iter().any(|s| s.0 == name) {
            let known: Vec<String> = SETTINGS.iter().map(|s| s.0.replace('-', "_")).collect();
            return Err(format!("unknown setting; the settings are {}", known.join(", ")));
        }
        self.set(&name, value)
    }

    /// Reads a JSON object of settings (the C ABI's `config_json`): the flags' names with `_`
    /// or `-` (`"model"`, `"max_running"`), values as strings, numbers or booleans. Settings
    /// not given keep their defaults; environment variables are not read.
    pub fn from_json(text: &str) -> Result<Config, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("the configuration is not valid JSON: {e}"))?;
        let serde_json::Value::Object(settings) = value else {
            return Err("the configuration must be a JSON object".into());
        };
        let mut config = Config::default();
        for (key, value) in &settings {
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                other => return Err(format!("{key:?}: {other} is not a string, number or boolean")),
            };
            config.set_named(key, &text).map_err(|e| format!("{key:?}: {e}"))?;
        }
        Ok(config)
    }

    fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        fn count(value: &str, min: usize) -> Result<usize, String> {
            let n: usize = value.trim().parse().map_err(|_| format!("{value:?} is not a whole number"))?;
            if n < min {
                return Err(format!("must be at least {min}, got {n}"));
            }
            Ok(n)
        }
        fn seconds(value: &str) -> Result<Duration, String> {
            match value.trim().parse::<f64>() {
                Ok(s) if s > 0.0 && s <= 1e6 => Ok(Duration::from_secs_f64(s)),
                _ => Err(format!("{value:?} is not a number of seconds above 0")),
            }
        }
        fn boolean(value: &str) -> Result<bool, String> {
            match value.trim() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(format!("{value:?} is not true or false")),
            }
        }
        match name {
            "model" => self.model = Some(PathBuf::from(value)),
            "listen" => {
                if value.parse::<std::net::SocketAddr>().is_err() {
                    return Err(format!("{value:?} is not an address like 127.0.0.1:8080"));
                }
                self.server.listen = value.to_owned();
            }
            "threads" => {
                self.runtime.intra_threads = count(value, 1)?;
                self.runtime.intra_threads_set = true;
            }
            "kv-cache-mb" => {
                self.runtime.kv_cache_bytes = count(value, 1)? << 20;
                self.kv_cache_set = true;
            }
            "kv-cache-dtype" => self.runtime.kv_cache_dtype = value.parse()?,
            "provider" => self.runtime.provider = value.parse()?,
            "prefix-cache-mb" => {
                self.engine.prefix_cache_bytes = count(value, 0)? << 20;
                self.prefix_cache_set = true;
            }
            "onnxruntime" => self.runtime.library = Some(PathBuf::from(value)),
            "served-model-name" => self.served_model_name = Some(value.to_owned()),
            "max-body-bytes" => self.server.max_body_bytes = count(value, 1024)?,
            "log-level" => {
                if !matches!(value, "error" | "warn" | "info" | "debug" | "trace" | "off") {
                    return Err(format!("{value:?} is not one of error, warn, info, debug, trace, off"));
                }
                self.log_level = value.to_owned();
            }
            "http-threads" => self.server.http_threads = count(value, 1)?,
            "max-running" => self.engine.max_running = count(value, 1)?,
            "workers" => self.engine.workers = count(value, 0)?,
            "max-queued" => self.engine.max_queued = count(value, 1)?,
            "max-queue-wait-s" => self.engine.max_queue_wait = seconds(value)?,
            "request-timeout-s" => self.engine.request_timeout = seconds(value)?,
            "idle-unload-s" => {
                self.server.idle_unload = match value.trim() {
                    "0" => None,
                    _ => Some(seconds(value)?),
                }
            }
            "sse-keepalive-s" => {
                self.server.sse_keepalive = match value.trim() {
                    "0" => None,
                    _ => Some(seconds(value)?),
                }
            }
            "prefill-chunk" => self.engine.prefill_chunk = count(value, 1)?,
            "speculative-tokens" => self.engine.speculative_tokens = count(value, 0)?.min(64),
            "stream-slowdown" => {
                self.engine.stream_slowdown = match value.trim().parse::<f64>() {
                    Ok(x) if (1.1..=1000.0).contains(&x) => x,
                    _ => return Err(format!("{value:?} is not a factor between 1.1 and 1000")),
                }
            }
            "log-prompts" => self.server.log_prompts = boolean(value)?,
            "max-connections" => self.server.max_connections = count(value, 1)?,
            "idle-timeout-s" => self.server.idle_timeout = seconds(value)?,
            "max-header-bytes" => self.server.max_header_bytes = count(value, 1024)?,
            "max-messages" => self.limits.max_messages = count(value, 1)?,
            "max-prompt-tokens" => self.limits.max_prompt_tokens = count(value, 0)?,
            "max-completion-tokens" => self.limits.max_completion_tokens = count(value, 0)?,
            "max-n" => self.limits.max_n = count(value, 1)?,
            "max-stop-strings" => self.limits.max_stop_strings = count(value, 0)?,
            "max-stop-length" => self.limits.max_stop_len = count(value, 1)?,
            "max-constraint-bytes" => {
                self.limits.max_constraint_bytes = count(value, 64)?;
                if self.limits.max_constraint_bytes > crate::constraint::MAX_SOURCE_BYTES {
                    return Err(format!("must be at most {}", crate::constraint::MAX_SOURCE_BYTES));
                }
            }
            "shutdown-timeout-s" => self.server.shutdown_timeout = seconds(value)?,
            "api-keys-file" => self.server.api_keys_file = Some(PathBuf::from(value)),
            "auth-health" => self.server.auth_health = boolean(value)?,
            "auth-metrics" => self.server.auth_metrics = boolean(value)?,
            "cors-origins" => {
                self.server.cors_origins =
                    value.split(',').map(str::trim).filter(|o| !o.is_empty()).map(str::to_owned).collect()
            }
            _ => return Err("unknown setting".into()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Config, String> {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match Config::parse(args.iter().map(|s| s.to_string()), |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })? {
            Command::Serve(c) | Command::Check(c) => Ok(*c),
            _ => Err("not serve".into()),
        }
    }

    fn file(name: &str, text: &str) -> String {
        let path = std::env::temp_dir().join(format!("chatd-config-test-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    #[test]
    fn file_then_environment_then_flags() {
        let path = file("layers", "threads = 3\nmax_running = 4\nlisten = \"127.0.0.1:9001\"\nauth_health = true\n");
        let c = parse(&["--config", &path], &[]).unwrap();
        assert_eq!((c.runtime.intra_threads, c.engine.max_running, c.server.auth_health), (3, 4, true));
        assert_eq!(c.file.as_deref(), Some(std::path::Path::new(&path)));
        let c = parse(&["--threads", "1"], &[("CHATD_CONFIG", &path), ("CHATD_MAX_RUNNING", "6")]).unwrap();
        assert_eq!((c.runtime.intra_threads, c.engine.max_running), (1, 6));
        assert_eq!(c.server.listen, "127.0.0.1:9001");
    }

    #[test]
    fn bad_files_name_the_file_the_key_and_the_reason() {
        let path = file("unknown", "max_runing = 4\n");
        let e = parse(&["--config", &path], &[]).unwrap_err();
        assert!(e.contains(&path) && e.contains("`max_runing`") && e.contains("unknown setting"), "{e}");
        let path = file("value", "idle_timeout_s = -1\n");
        let e = parse(&["--config", &path], &[]).unwrap_err();
        assert!(e.contains(&path) && e.contains("`idle_timeout_s`") && e.contains("seconds"), "{e}");
        let path = file("syntax", "threads = \n");
        let e = parse(&["--config", &path], &[]).unwrap_err();
        assert!(e.contains(&path) && e.contains("line 1"), "{e}");
        let path = file("table", "[engine]\nthreads = 2\n");
        assert!(parse(&["--config", &path], &[]).unwrap_err().contains("`engine`"));
        let e = parse(&["--config", "/nonexistent/chatd.toml"], &[]).unwrap_err();
        assert!(e.contains("/nonexistent/chatd.toml"), "{e}");
        assert!(matches!(Config::parse(["--check-config".to_string()], |_| None), Ok(Command::Check(_))));
    }

    #[test]
    fn flags_override_environment_override_defaults() {
        let c = parse(&[], &[]).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        let c = parse(&["--threads", "3"], &[("CHATD_THREADS", "1"), ("CHATD_LISTEN", "127.0.0.1:9000")]).unwrap();
        assert_eq!(c.runtime.intra_threads, 3);
        assert_eq!(c.server.listen, "127.0.0.1:9000");
        let c = parse(&["--max-body-bytes=2048"], &[]).unwrap();
        assert_eq!(c.server.max_body_bytes, 2048);
    }

    #[test]
    fn bad_values_name_the_setting() {
        assert!(parse(&["--threads", "zero"], &[]).unwrap_err().contains("--threads"));
        assert!(parse(&[], &[("CHATD_MAX_RUNNING", "0")]).unwrap_err().contains("CHATD_MAX_RUNNING"));
        assert!(parse(&["--listen", "nowhere"], &[]).unwrap_err().contains("--listen"));
        assert!(parse(&["--bogus", "1"], &[]).unwrap_err().contains("unknown option --bogus"));
        assert!(parse(&["--model"], &[]).unwrap_err().contains("needs a value"));
    }

    #[test]
    fn json_settings_use_the_flag_names() {
        let c = Config::from_json(r#"{"model": "/m", "max_running": 4, "kv-cache-mb": "64"}"#).unwrap();
        assert_eq!(c.model.as_deref(), Some(std::path::Path::new("/m")));
        assert_eq!(c.engine.max_running, 4);
        assert_eq!(c.runtime.kv_cache_bytes, 64 << 20);
        assert!(Config::from_json(r#"{"max_running": 0}"#).unwrap_err().contains("\"max_running\""));
        assert!(Config::from_json(r#"{"bogus": 1}"#).unwrap_err().contains("\"bogus\": unknown setting"));
        assert!(Config::from_json(r#"{"threads": [2]}"#).unwrap_err().contains("not a string"));
        assert!(Config::from_json("[]").unwrap_err().contains("JSON object"));
    }
}
