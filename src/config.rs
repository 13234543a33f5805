//! The daemon's settings: defaults, overridden by a TOML file (`--config`, else
//! `$CHATD_CONFIG`, else /etc/chatd/chatd.toml when it exists), overridden by `CHATD_*`
//! environment variables, overridden by command-line flags. Every bad value fails at startup
//! with where it came from, the setting's name and why. The C ABI reads the same settings
//! from JSON.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api::Limits;
use crate::engine::EngineConfig;
use crate::model::{KvCacheDtype, Provider, RuntimeOptions};
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

/// One setting, declared once: its flag (from which its environment variable, TOML key and
/// libchat JSON key are derived), what it takes, what it does, how a value is stored, and the
/// stored value (compared on reload; written out, it gives the default in `--help` and in the
/// README's table, and what a reload reports).
pub(crate) struct Setting {
    pub flag: &'static str,
    /// The value's name in `--help` and the README (`N`, `SECS`, `PATH`...).
    pub value: &'static str,
    pub help: &'static str,
    /// Whether a running daemon takes a new value on SIGHUP (else it needs a restart).
    pub live: bool,
    set: fn(&mut Config, &str) -> Result<(), String>,
    get: fn(&Config) -> Value,
}

/// A setting's value as `Config` holds it, typed: a reload compares these, and `Display` writes
/// them the way a user sets them.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    Text(String),
    Count(usize),
    Factor(f64),
    Flag(bool),
    Seconds(Duration),
    /// Seconds, or 0 for never.
    SecondsOrNever(Option<Duration>),
    /// MiB; `None`: sized at start ("auto").
    Mib(Option<usize>),
    Path(Option<PathBuf>),
    /// A value that may be left out, and what applies then.
    Or(Option<String>, &'static str),
    Provider(Provider),
    KvCacheDtype(KvCacheDtype),
    List(Vec<String>),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seconds = |d: &Duration| {
            let s = d.as_secs_f64();
            if s.fract() == 0.0 { format!("{}", s as u64) } else { s.to_string() }
        };
        match self {
            Value::Text(t) => f.write_str(t),
            Value::Count(n) => write!(f, "{n}"),
            Value::Factor(x) => write!(f, "{x:?}"),
            Value::Flag(b) => write!(f, "{b}"),
            Value::Seconds(d) => f.write_str(&seconds(d)),
            Value::SecondsOrNever(d) => f.write_str(&d.as_ref().map_or("0".into(), seconds)),
            Value::Mib(mib) => f.write_str(&mib.map_or("auto".into(), |m| m.to_string())),
            Value::Path(p) => f.write_str(&p.as_ref().map_or(String::new(), |p| p.display().to_string())),
            Value::Or(v, otherwise) => f.write_str(v.as_deref().unwrap_or(otherwise)),
            Value::Provider(p) => write!(f, "{p}"),
            Value::KvCacheDtype(d) => write!(f, "{d}"),
            Value::List(items) => f.write_str(&items.join(",")),
        }
    }
}

impl Setting {
    /// `CHATD_` and the flag in capitals, `-` as `_`.
    pub fn env(&self) -> String {
        format!("CHATD_{}", self.flag.to_uppercase().replace('-', "_"))
    }

    /// The key in a TOML file and in libchat's JSON: the flag with `_` for `-`.
    pub fn key(&self) -> String {
        self.flag.replace('-', "_")
    }

    /// The value as `config` holds it.
    pub fn value(&self, config: &Config) -> Value {
        (self.get)(config)
    }

    /// The value as `config` holds it, written as a user sets it.
    pub fn shown(&self, config: &Config) -> String {
        self.value(config).to_string()
    }

    /// The default: the value of a configuration nothing was set in.
    pub fn default_value(&self) -> String {
        self.shown(&Config::default())
    }
}

/// What a reload from `old` to `new` changes, as the log and systemd's status say it: `key=value`
/// for each setting applied at once, `key (needs a restart)` for the others.
pub fn changes(old: &Config, new: &Config) -> Vec<String> {
    SETTINGS
        .iter()
        .filter(|s| s.value(old) != s.value(new))
        .map(|s| match s.live {
            true => format!("{}={}", s.key(), s.shown(new)),
            false => format!("{} (needs a restart)", s.key()),
        })
        .collect()
}

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

/// Seconds, or 0 for never.
fn seconds_or_never(value: &str) -> Result<Option<Duration>, String> {
    match value.trim() {
        "0" => Ok(None),
        _ => seconds(value).map(Some),
    }
}

fn boolean(value: &str) -> Result<bool, String> {
    match value.trim() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("{value:?} is not true or false")),
    }
}

fn mib(set: bool, bytes: usize) -> Value {
    Value::Mib(set.then_some(bytes >> 20))
}

pub(crate) const SETTINGS: &[Setting] = &[
    Setting {
        flag: "model",
        live: false,
        value: "DIR",
        help: "model folder (onnxruntime-genai or Hugging Face Optimum ONNX layout); required",
        set: |c, v| {
            c.model = Some(PathBuf::from(v));
            Ok(())
        },
        get: |c| Value::Or(c.model.as_ref().map(|p| p.display().to_string()), "(required)"),
    },
    Setting {
        flag: "listen",
        live: false,
        value: "ADDR",
        help: "address to serve on",
        set: |c, v| {
            if v.parse::<std::net::SocketAddr>().is_err() {
                return Err(format!("{v:?} is not an address like 127.0.0.1:8080"));
            }
            c.server.listen = v.to_owned();
            Ok(())
        },
        get: |c| Value::Text(c.server.listen.clone()),
    },
    Setting {
        flag: "threads",
        live: false,
        value: "N",
        help: "ONNX Runtime intra-op threads",
        set: |c, v| {
            c.runtime.intra_threads = count(v, 1)?;
            c.runtime.intra_threads_set = true;
            Ok(())
        },
        get: |c| Value::Count(c.runtime.intra_threads),
    },
    Setting {
        flag: "provider",
        live: false,
        value: "EP",
        help: "execution provider: cpu, cuda[:N], tensorrt[:N] (GPU ONNX Runtime)",
        set: |c, v| {
            c.runtime.provider = v.parse()?;
            Ok(())
        },
        get: |c| Value::Provider(c.runtime.provider),
    },
    Setting {
        flag: "onnxruntime",
        live: false,
        value: "PATH",
        help: "libonnxruntime.so to load (else ORT_DYLIB_PATH, the setup copy, the system)",
        set: |c, v| {
            c.runtime.library = Some(PathBuf::from(v));
            Ok(())
        },
        get: |c| Value::Path(c.runtime.library.clone()),
    },
    Setting {
        flag: "served-model-name",
        live: false,
        value: "NAME",
        help: "model name clients use",
        set: |c, v| {
            c.served_model_name = Some(v.to_owned());
            Ok(())
        },
        get: |c| Value::Or(c.served_model_name.clone(), "folder name"),
    },
    Setting {
        flag: "max-body-bytes",
        live: true,
        value: "N",
        help: "largest request body; larger ones get 413",
        set: |c, v| {
            c.server.max_body_bytes = count(v, 1024)?;
            Ok(())
        },
        get: |c| Value::Count(c.server.max_body_bytes),
    },
    Setting {
        flag: "log-level",
        live: true,
        value: "LEVEL",
        help: "error, warn, info, debug or trace",
        set: |c, v| {
            if !matches!(v, "error" | "warn" | "info" | "debug" | "trace" | "off") {
                return Err(format!("{v:?} is not one of error, warn, info, debug, trace, off"));
            }
            c.log_level = v.to_owned();
            Ok(())
        },
        get: |c| Value::Text(c.log_level.clone()),
    },
    Setting {
        flag: "http-threads",
        live: false,
        value: "N",
        help: "threads serving HTTP requests (one stream each)",
        set: |c, v| {
            c.server.http_threads = count(v, 1)?;
            Ok(())
        },
        get: |c| Value::Count(c.server.http_threads),
    },
    Setting {
        flag: "max-running",
        live: false,
        value: "N",
        help: "sequences generating at once",
        set: |c, v| {
            c.engine.max_running = count(v, 1)?;
            Ok(())
        },
        get: |c| Value::Count(c.engine.max_running),
    },
    Setting {
        flag: "workers",
        live: false,
        value: "N",
        help: "threads for sampling/detokenizing beside the model; 0 = engine thread",
        set: |c, v| {
            c.engine.workers = count(v, 0)?;
            Ok(())
        },
        get: |c| Value::Count(c.engine.workers),
    },
    Setting {
        flag: "max-queued",
        live: false,
        value: "N",
        help: "requests waiting for a place before 429s",
        set: |c, v| {
            c.engine.max_queued = count(v, 1)?;
            Ok(())
        },
        get: |c| Value::Count(c.engine.max_queued),
    },
    Setting {
        flag: "max-queue-wait-s",
        live: false,
        value: "SECS",
        help: "longest wait for a place before a 429",
        set: |c, v| {
            c.engine.max_queue_wait = seconds(v)?;
            Ok(())
        },
        get: |c| Value::Seconds(c.engine.max_queue_wait),
    },
    Setting {
        flag: "request-timeout-s",
        live: true,
        value: "SECS",
        help: "deadline of requests without `timeout`",
        set: |c, v| {
            c.engine.request_timeout = seconds(v)?;
            Ok(())
        },
        get: |c| Value::Seconds(c.engine.request_timeout),
    },
    Setting {
        flag: "prefill-chunk",
        live: false,
        value: "N",
        help: "prompts are cut into model runs at multiples of it (a run spans several chunks where this machine's kernels allow, see /health's prefill)",
        set: |c, v| {
            c.engine.prefill_chunk = count(v, 1)?;
            Ok(())
        },
        get: |c| Value::Count(c.engine.prefill_chunk),
    },
    Setting {
        flag: "stream-slowdown",
        live: false,
        value: "X",
        help: "most slowdown of running streams while a new prompt is fed",
        set: |c, v| {
            c.engine.stream_slowdown = match v.trim().parse::<f64>() {
                Ok(x) if (1.1..=1000.0).contains(&x) => x,
                _ => return Err(format!("{v:?} is not a factor between 1.1 and 1000")),
            };
            Ok(())
        },
        get: |c| Value::Factor(c.engine.stream_slowdown),
    },
    Setting {
        flag: "speculative-tokens",
        live: false,
        value: "N",
        help: "draft tokens checked per run while one stream generates alone (genai layout); 0 = off",
        set: |c, v| {
            c.engine.speculative_tokens = count(v, 0)?.min(64);
            Ok(())
        },
        get: |c| Value::Count(c.engine.speculative_tokens),
    },
    Setting {
        flag: "kv-cache-mb",
        live: false,
        value: "N",
        help: "most memory for the genai layout's shared KV cache (auto: 2/5 of the memory available after loading, at most 1024)",
        set: |c, v| {
            c.runtime.kv_cache_bytes = count(v, 1)? << 20;
            c.kv_cache_set = true;
            Ok(())
        },
        get: |c| mib(c.kv_cache_set, c.runtime.kv_cache_bytes),
    },
    Setting {
        flag: "kv-cache-dtype",
        live: false,
        value: "TYPE",
        help: "how the genai layout stores keys and values: float32, int8 (a quarter of the memory) or int4",
        set: |c, v| {
            c.runtime.kv_cache_dtype = v.parse()?;
            Ok(())
        },
        get: |c| Value::KvCacheDtype(c.runtime.kv_cache_dtype),
    },
    Setting {
        flag: "prefix-cache-mb",
        live: false,
        value: "N",
        help: "memory for prompt keys/values reused across requests; 0 = off (auto: 1/10 of the memory available, at most 256)",
        set: |c, v| {
            c.engine.prefix_cache_bytes = count(v, 0)? << 20;
            c.prefix_cache_set = true;
            Ok(())
        },
        get: |c| mib(c.prefix_cache_set, c.engine.prefix_cache_bytes),
    },
    Setting {
        flag: "log-prompts",
        live: true,
        value: "BOOL",
        help: "log prompt text (at debug level)",
        set: |c, v| {
            c.server.log_prompts = boolean(v)?;
            Ok(())
        },
        get: |c| Value::Flag(c.server.log_prompts),
    },
    Setting {
        flag: "max-connections",
        live: true,
        value: "N",
        help: "connections served at once; more get 503",
        set: |c, v| {
            c.server.max_connections = count(v, 1)?;
            Ok(())
        },
        get: |c| Value::Count(c.server.max_connections),
    },
    Setting {
        flag: "idle-timeout-s",
        live: true,
        value: "SECS",
        help: "close connections silent this long, in or between requests",
        set: |c, v| {
            c.server.idle_timeout = seconds(v)?;
            Ok(())
        },
        get: |c| Value::Seconds(c.server.idle_timeout),
    },
    Setting {
        flag: "max-header-bytes",
        live: true,
        value: "N",
        help: "largest request line + headers; larger get 431",
        set: |c, v| {
            c.server.max_header_bytes = count(v, 1024)?;
            Ok(())
        },
        get: |c| Value::Count(c.server.max_header_bytes),
    },
    Setting {
        flag: "max-messages",
        live: true,
        value: "N",
        help: "most messages in a chat request",
        set: |c, v| {
            c.limits.max_messages = count(v, 1)?;
            Ok(())
        },
        get: |c| Value::Count(c.limits.max_messages),
    },
    Setting {
        flag: "max-prompt-tokens",
        live: true,
        value: "N",
        help: "most prompt tokens; 0 = the model's context",
        set: |c, v| {
            c.limits.max_prompt_tokens = count(v, 0)?;
            Ok(())
        },
        get: |c| Value::Count(c.limits.max_prompt_tokens),
    },
    Setting {
        flag: "max-completion-tokens",
        live: true,
        value: "N",
        help: "largest max_tokens; 0 = the model's context",
        set: |c, v| {
            c.limits.max_completion_tokens = count(v, 0)?;
            Ok(())
        },
        get: |c| Value::Count(c.limits.max_completion_tokens),
    },
    Setting {
        flag: "max-n",
        live: true,
        value: "N",
        help: "most choices (n) per request",
        set: |c, v| {
            c.limits.max_n = count(v, 1)?;
            Ok(())
        },
        get: |c| Value::Count(c.limits.max_n),
    },
    Setting {
        flag: "max-stop-strings",
        live: true,
        value: "N",
        help: "most stop strings per request",
        set: |c, v| {
            c.limits.max_stop_strings = count(v, 0)?;
            Ok(())
        },
        get: |c| Value::Count(c.limits.max_stop_strings),
    },
    Setting {
        flag: "max-stop-length",
        live: true,
        value: "N",
        help: "longest stop string in bytes",
        set: |c, v| {
            c.limits.max_stop_len = count(v, 1)?;
            Ok(())
        },
        get: |c| Value::Count(c.limits.max_stop_len),
    },
    Setting {
        flag: "max-constraint-bytes",
        live: true,
        value: "N",
        help: "longest regex, grammar or JSON schema (tools' included) in bytes, at most 65536",
        set: |c, v| {
            c.limits.max_constraint_bytes = count(v, 64)?;
            if c.limits.max_constraint_bytes > crate::constraint::MAX_SOURCE_BYTES {
                return Err(format!("must be at most {}", crate::constraint::MAX_SOURCE_BYTES));
            }
            Ok(())
        },
        get: |c| Value::Count(c.limits.max_constraint_bytes),
    },
    Setting {
        flag: "shutdown-timeout-s",
        live: true,
        value: "SECS",
        help: "on SIGTERM, time in-flight requests get to finish",
        set: |c, v| {
            c.server.shutdown_timeout = seconds(v)?;
            Ok(())
        },
        get: |c| Value::Seconds(c.server.shutdown_timeout),
    },
    Setting {
        flag: "idle-unload-s",
        live: true,
        value: "SECS",
        help: "release the model after this long without requests, load it again for the next; 0 = never",
        set: |c, v| {
            c.server.idle_unload = seconds_or_never(v)?;
            Ok(())
        },
        get: |c| Value::SecondsOrNever(c.server.idle_unload),
    },
    Setting {
        flag: "api-keys-file",
        live: true,
        value: "PATH",
        help: "file of accepted API keys, one per line; unset = no keys",
        set: |c, v| {
            c.server.api_keys_file = Some(PathBuf::from(v));
            Ok(())
        },
        get: |c| Value::Path(c.server.api_keys_file.clone()),
    },
    Setting {
        flag: "auth-health",
        live: true,
        value: "BOOL",
        help: "whether /health needs an API key too",
        set: |c, v| {
            c.server.auth_health = boolean(v)?;
            Ok(())
        },
        get: |c| Value::Flag(c.server.auth_health),
    },
    Setting {
        flag: "auth-metrics",
        live: true,
        value: "BOOL",
        help: "whether /metrics needs an API key too",
        set: |c, v| {
            c.server.auth_metrics = boolean(v)?;
            Ok(())
        },
        get: |c| Value::Flag(c.server.auth_metrics),
    },
    Setting {
        flag: "sse-keepalive-s",
        live: true,
        value: "SECS",
        help: "a comment line on a stream that has sent nothing for this long (a long prompt); 0 = never",
        set: |c, v| {
            c.server.sse_keepalive = seconds_or_never(v)?;
            Ok(())
        },
        get: |c| Value::SecondsOrNever(c.server.sse_keepalive),
    },
    Setting {
        flag: "cors-origins",
        live: true,
        value: "LIST",
        help: "web origins (https://app.local,...) browsers may call the API from, or *; empty = no CORS",
        set: |c, v| {
            c.server.cors_origins = v.split(',').map(str::trim).filter(|o| !o.is_empty()).map(str::to_owned).collect();
            Ok(())
        },
        get: |c| Value::List(c.server.cors_origins.clone()),
    },
];

pub fn usage() -> String {
    let mut out = String::from(
        "chatd: an OpenAI-compatible chat server for ONNX models\n\nUsage: chatd --model DIR [options]\n\nOptions (each also read from its environment variable; flags win):\n",
    );
    for s in SETTINGS {
        let default = s.default_value();
        let default =
            if default.is_empty() || default == "(required)" { String::new() } else { format!(" [{default}]") };
        out +=
            &format!("  {:<26} {}{default}\n  {:<26} ${}\n", format!("--{} {}", s.flag, s.value), s.help, "", s.env());
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
            } else if SETTINGS.iter().any(|s| s.flag == name) {
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
        for s in SETTINGS {
            let var = s.env();
            if let Some(value) = env(&var).filter(|v| !v.is_empty()) {
                (s.set)(&mut config, &value).map_err(|e| format!("${var}: {e}"))?;
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
        if !SETTINGS.iter().any(|s| s.flag == name) {
            let known: Vec<String> = SETTINGS.iter().map(Setting::key).collect();
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
        let setting = SETTINGS.iter().find(|s| s.flag == name).ok_or("unknown setting")?;
        (setting.set)(self, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_names_what_a_reload_applies() {
        let readme = include_str!("../README.md");
        let paragraph = readme.split("SIGHUP re-reads").nth(1).unwrap().split("\n\n").next().unwrap();
        for s in SETTINGS.iter().filter(|s| s.live) {
            assert!(
                paragraph.contains(&format!("`{}`", s.key())),
                "the README's SIGHUP paragraph misses `{}`",
                s.key()
            );
        }
        let old = Config::default();
        let mut new = old.clone();
        new.set("max-n", "3").unwrap();
        new.set("threads", "4").unwrap();
        assert_eq!(changes(&old, &new), ["threads (needs a restart)", "max_n=3"]);
    }

    #[test]
    fn a_default_as_written_reads_back_as_the_same_value() {
        // What `--help` and the README show as the default is what setting it gives, typed.
        let default = Config::default();
        for s in SETTINGS {
            let written = s.shown(&default);
            if matches!(written.as_str(), "" | "auto" | "(required)" | "folder name") {
                continue; // left unset by default
            }
            let mut config = Config::default();
            (s.set)(&mut config, &written).unwrap_or_else(|e| panic!("{}: {written:?}: {e}", s.flag));
            assert_eq!(s.value(&config), s.value(&default), "{} written as {written:?}", s.flag);
        }
    }

    #[test]
    fn the_example_file_shows_every_setting() {
        let example = include_str!("../systemd/chatd.toml");
        for s in SETTINGS {
            let (set, commented) = (format!("\n{} = ", s.key()), format!("\n# {} = ", s.key()));
            assert!(example.contains(&set) || example.contains(&commented), "systemd/chatd.toml misses {}", s.key());
        }
    }

    #[test]
    fn the_readme_table_is_the_declarations() {
        // Rows of the Configuration table: | `--flag VALUE` | `VARIABLE` | default | what |
        let readme = include_str!("../README.md");
        let rows: Vec<(String, String, String)> = readme
            .lines()
            .filter(|l| l.starts_with("| `--"))
            .map(|l| {
                let cells: Vec<String> = l.split('|').skip(1).map(|c| c.trim_matches([' ', '`']).to_owned()).collect();
                (cells[0].clone(), cells[1].clone(), cells[2].clone())
            })
            .collect();
        let declared: Vec<(String, String, String)> =
            SETTINGS.iter().map(|s| (format!("--{} {}", s.flag, s.value), s.env(), s.default_value())).collect();
        for row in &declared {
            assert!(rows.contains(row), "the README has no row {row:?}");
        }
        for row in &rows {
            assert!(declared.contains(row), "the README's row {row:?} is no declared setting");
        }
    }

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
