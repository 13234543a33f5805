//! The daemon's settings: defaults, overridden by `CHATD_*` environment variables, overridden
//! by command-line flags. Every bad value fails at startup with the setting's name and why.

use std::path::PathBuf;

use crate::engine::EngineConfig;
use crate::model::RuntimeOptions;
use crate::server::ServerConfig;

#[derive(Clone, Debug)]
pub struct Config {
    pub model: Option<PathBuf>,
    pub served_model_name: Option<String>,
    pub runtime: RuntimeOptions,
    pub server: ServerConfig,
    pub engine: EngineConfig,
    pub log_level: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            model: None,
            served_model_name: None,
            runtime: RuntimeOptions::default(),
            server: ServerConfig::default(),
            engine: EngineConfig::default(),
            log_level: "info".into(),
        }
    }
}

/// What the command line asks for.
pub enum Command {
    Serve(Box<Config>),
    Help,
    Version,
}

/// (flag, environment variable, value name, help)
const SETTINGS: &[(&str, &str, &str, &str)] = &[
    ("model", "CHATD_MODEL", "DIR", "model folder (onnxruntime-genai or Hugging Face Optimum ONNX layout); required"),
    ("listen", "CHATD_LISTEN", "ADDR", "address to serve on [127.0.0.1:8080]"),
    ("threads", "CHATD_THREADS", "N", "ONNX Runtime intra-op threads [2]"),
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
    ("kv-cache-mb", "CHATD_KV_CACHE_MB", "N", "most memory for the genai layout's shared KV cache [1024]"),
    (
        "prefix-cache-mb",
        "CHATD_PREFIX_CACHE_MB",
        "N",
        "memory for prompt keys/values reused across requests; 0 = off [256]",
    ),
];

pub fn usage() -> String {
    let mut out = String::from(
        "chatd: an OpenAI-compatible chat server for ONNX models\n\nUsage: chatd --model DIR [options]\n\nOptions (each also read from its environment variable; flags win):\n",
    );
    for (flag, env, value, help) in SETTINGS {
        out += &format!("  {:<26} {help}\n  {:<26} ${env}\n", format!("--{flag} {value}"), "");
    }
    out += &format!("  {:<26} this text\n  {:<26} print the version\n", "--help", "--version");
    out
}

impl Config {
    /// Reads the environment, then `args` (without the program name).
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Command, String> {
        let mut config = Config::default();
        for (flag, var, _, _) in SETTINGS {
            if let Some(value) = env(var).filter(|v| !v.is_empty()) {
                config.set(flag, &value).map_err(|e| format!("${var}: {e}"))?;
            }
        }
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-h" | "--help" => return Ok(Command::Help),
                "-V" | "--version" => return Ok(Command::Version),
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
            if !SETTINGS.iter().any(|s| s.0 == name) {
                return Err(format!("unknown option --{name}; see --help"));
            }
            config.set(&name, &value).map_err(|e| format!("--{name}: {e}"))?;
        }
        Ok(Command::Serve(Box::new(config)))
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
            let name = key.replace('_', "-");
            if !SETTINGS.iter().any(|s| s.0 == name) {
                let known: Vec<String> = SETTINGS.iter().map(|s| s.0.replace('-', "_")).collect();
                return Err(format!("unknown setting {key:?}; known settings: {}", known.join(", ")));
            }
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                other => return Err(format!("{key:?}: {other} is not a string, number or boolean")),
            };
            config.set(&name, &text).map_err(|e| format!("{key:?}: {e}"))?;
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
        fn seconds(value: &str) -> Result<std::time::Duration, String> {
            match value.trim().parse::<f64>() {
                Ok(s) if s > 0.0 && s <= 1e6 => Ok(std::time::Duration::from_secs_f64(s)),
                _ => Err(format!("{value:?} is not a number of seconds above 0")),
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
            "kv-cache-mb" => self.runtime.kv_cache_bytes = count(value, 1)? << 20,
            "prefix-cache-mb" => self.engine.prefix_cache_bytes = count(value, 0)? << 20,
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
            "prefill-chunk" => self.engine.prefill_chunk = count(value, 1)?,
            "stream-slowdown" => {
                self.engine.stream_slowdown = match value.trim().parse::<f64>() {
                    Ok(x) if (1.1..=1000.0).contains(&x) => x,
                    _ => return Err(format!("{value:?} is not a factor between 1.1 and 1000")),
                }
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
            Command::Serve(c) => Ok(*c),
            _ => Err("not serve".into()),
        }
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
        assert!(Config::from_json(r#"{"bogus": 1}"#).unwrap_err().contains("unknown setting \"bogus\""));
        assert!(Config::from_json(r#"{"threads": [2]}"#).unwrap_err().contains("not a string"));
        assert!(Config::from_json("[]").unwrap_err().contains("JSON object"));
    }
}
