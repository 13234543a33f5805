//! Finding and loading `libonnxruntime`, and the session options every model gets.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use ort::session::{Session, builder::GraphOptimizationLevel};

/// How to run models: which runtime library, how many threads.
#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    /// `--onnxruntime`: a path to `libonnxruntime.so*`, tried before anything else.
    pub library: Option<PathBuf>,
    /// Intra-op threads per session (2 was fastest for the small models on a 2-core box).
    pub intra_threads: usize,
    /// Whether `intra_threads` was set explicitly (else a model's own config may choose).
    pub intra_threads_set: bool,
    /// Let ONNX Runtime's threads spin between ops (faster decode, busier cores when idle).
    pub spin: bool,
    /// Most bytes the shared KV pool of the genai layout may hold.
    pub kv_cache_bytes: usize,
    /// How the genai layout's KV pool stores keys and values.
    pub kv_cache_dtype: super::KvCacheDtype,
    /// Where the model runs.
    pub provider: Provider,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            library: None,
            intra_threads: 2,
            intra_threads_set: false,
            spin: true,
            kv_cache_bytes: 1 << 30,
            kv_cache_dtype: super::KvCacheDtype::Float32,
            provider: Provider::Cpu,
        }
    }
}

/// ONNX Runtime's execution provider for the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    Cpu,
    /// NVIDIA CUDA, on this device.
    Cuda(i32),
    /// NVIDIA TensorRT (falling back to CUDA for what it cannot run), on this device.
    TensorRt(i32),
}

impl std::str::FromStr for Provider {
    type Err = String;

    /// `cpu`, `cuda`, `cuda:N`, `tensorrt`, `tensorrt:N`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, device) = match s.trim().split_once(':') {
            Some((name, device)) => {
                (name, device.parse::<i32>().map_err(|_| format!("{device:?} is not a device number"))?)
            }
            None => (s.trim(), 0),
        };
        match name {
            "cpu" => Ok(Provider::Cpu),
            "cuda" => Ok(Provider::Cuda(device)),
            "tensorrt" => Ok(Provider::TensorRt(device)),
            _ => Err(format!("{s:?} is not one of cpu, cuda, cuda:N, tensorrt, tensorrt:N")),
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Provider::Cpu => f.write_str("cpu"),
            Provider::Cuda(d) => write!(f, "cuda:{d}"),
            Provider::TensorRt(d) => write!(f, "tensorrt:{d}"),
        }
    }
}

/// Why the runtime could not be loaded; printed as one line by the daemon.
#[derive(Debug)]
pub struct RuntimeError {
    pub message: String,
}

impl fmt::Display for RuntimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RuntimeError {}

const HOW_TO_INSTALL: &str = "install it with scripts/setup-onnxruntime.sh (PyPI onnxruntime 1.32.0), \
     or pass --onnxruntime /path/to/libonnxruntime.so (ONNX Runtime 1.19 or newer)";

static ENVIRONMENT: OnceLock<std::result::Result<(PathBuf, ort::environment::Environment), String>> = OnceLock::new();

/// Loads ONNX Runtime once per process. The first of these that exists is used:
/// `options.library`, `ORT_DYLIB_PATH`, a copy installed by `scripts/setup-onnxruntime.sh`
/// (next to the executable, in `../lib`, or in the source tree's `.runtime/lib`), and finally
/// `libonnxruntime.so` on the system library path.
pub fn init(options: &RuntimeOptions) -> Result<&'static Path, RuntimeError> {
    let loaded = ENVIRONMENT.get_or_init(|| load(options).map_err(|e| e.message));
    match loaded {
        Ok((path, _)) => Ok(path),
        Err(message) => Err(RuntimeError { message: message.clone() }),
    }
}

fn load(options: &RuntimeOptions) -> Result<(PathBuf, ort::environment::Environment), RuntimeError> {
    let explicit = options.library.clone().map(|p| (p, "--onnxruntime")).or_else(|| {
        std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()).map(|p| (PathBuf::from(p), "ORT_DYLIB_PATH"))
    });
    let path = match explicit {
        Some((path, source)) => {
            if !path.exists() {
                return Err(RuntimeError {
                    message: format!(
                        "ONNX Runtime library {} (from {source}) does not exist; {HOW_TO_INSTALL}",
                        path.display()
                    ),
                });
            }
            path
        }
        None => {
            let candidates = candidate_paths();
            match candidates.iter().find(|p| p.exists()) {
                Some(p) => p.clone(),
                // Let the dynamic loader search the system library path.
                None => PathBuf::from("libonnxruntime.so"),
            }
        }
    };
    let builder = ort::init_from(&path).map_err(|e| {
        let looked = candidate_paths().iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        RuntimeError {
            message: format!(
                "cannot load ONNX Runtime ({e}); looked at --onnxruntime, ORT_DYLIB_PATH, {looked} and the system library path; {HOW_TO_INSTALL}"
            ),
        }
    })?;
    let env = builder
        .with_name("chatd")
        .with_telemetry(false)
        .build()
        .map_err(|e| RuntimeError { message: format!("cannot start ONNX Runtime from {}: {e}", path.display()) })?;
    // ort registers its tracing logger at VERBOSE; ask only for warnings and errors so ONNX
    // Runtime does not format and forward log records on the hot path.
    env.set_log_level(ort::logging::LogLevel::Warning);
    log::info!(
        "ONNX Runtime {} loaded from {}",
        library_version(&path).unwrap_or_else(|| "(unknown version)".into()),
        path.display()
    );
    Ok((path, env))
}

/// Where `scripts/setup-onnxruntime.sh` and `scripts/install.sh` put the library: beside the
/// file this code was loaded from (chatd, libchat.so, or a program linking libchat.a) or in
/// its `../lib/chatd` or `../lib`.
fn candidate_paths() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = own_file().and_then(|p| p.parent().map(Path::to_path_buf)) {
        dirs.push(dir.clone());
        dirs.push(dir.join("../lib/chatd"));
        dirs.push(dir.join("../lib"));
    }
    dirs.push(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.runtime/lib")));
    dirs.into_iter().map(|d| d.join("libonnxruntime.so")).collect()
}

/// The executable or shared library holding this function.
fn own_file() -> Option<PathBuf> {
    // SAFETY: dladdr only reads the loader's tables; `info` is plain data it fills in, and
    // dli_fname points to a NUL-terminated string owned by the loader.
    let from_loader = unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        let found = libc::dladdr(own_file as *const std::ffi::c_void, &mut info) != 0 && !info.dli_fname.is_null();
        found.then(|| PathBuf::from(std::ffi::CStr::from_ptr(info.dli_fname).to_string_lossy().into_owned()))
    };
    // The main program may be reported by its bare name; the kernel knows its full path.
    from_loader.filter(|p| p.is_absolute()).or_else(|| std::env::current_exe().ok())
}

/// The version the runtime library at `path` reports, e.g. "1.32.0".
fn library_version(path: &Path) -> Option<String> {
    #[repr(C)]
    struct OrtApiBase {
        get_api: unsafe extern "C" fn(u32) -> *const std::ffi::c_void,
        get_version_string: unsafe extern "C" fn() -> *const std::ffi::c_char,
    }
    // SAFETY: the library was just loaded by ort from this path (dlopen returns the same handle);
    // OrtGetApiBase has this signature in every ONNX Runtime release and returns static data.
    unsafe {
        let lib = libloading::Library::new(path).ok()?;
        let get_base: libloading::Symbol<unsafe extern "C" fn() -> *const OrtApiBase> =
            lib.get(b"OrtGetApiBase").ok()?;
        let base = get_base();
        if base.is_null() {
            return None;
        }
        let version = ((*base).get_version_string)();
        (!version.is_null()).then(|| std::ffi::CStr::from_ptr(version).to_string_lossy().into_owned())
    }
}

/// Opens a session with the options that measured fastest for decoder models on small CPUs.
pub(crate) fn open_session(file: &Path, options: &RuntimeOptions) -> Result<Session> {
    // A graph whose weights are in external files is small; one whose weights are inside may
    // be gigabytes and has no external data to follow.
    const GRAPH_ONLY: u64 = 256 << 20;
    let size = std::fs::metadata(file).with_context(|| format!("reading {}", file.display()))?.len();
    let dir = file.parent().unwrap_or(Path::new("."));
    if size <= GRAPH_ONLY && is_linked(dir, file) {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        return open_session_from_memory(&bytes, dir, options);
    }
    Ok(builder(options)?.commit_from_file(file)?)
}

/// Whether `file` or its folder's entries are symlinks (the Hugging Face cache layout).
fn is_linked(dir: &Path, file: &Path) -> bool {
    let linked = |p: &Path| p.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink());
    linked(file) || std::fs::read_dir(dir).is_ok_and(|entries| entries.flatten().any(|e| linked(&e.path())))
}

/// Like `open_session`, for a model already in memory whose external weights live in `dir`.
pub(crate) fn open_session_from_memory(model: &[u8], dir: &Path, options: &RuntimeOptions) -> Result<Session> {
    let (model, dir) = follow_linked_data(model, dir)?;
    let model = model.as_ref();
    let dir = dir.to_str().context("the model folder's path is not UTF-8")?;
    let mut builder = builder(options)?
        .with_config_entry("session.model_external_initializers_file_folder_path", dir)
        .map_err(ort::Error::<()>::from)?;
    Ok(builder.commit_from_memory(model)?)
}

/// The model and the folder ONNX Runtime should read its external data from. ONNX Runtime
/// refuses data files reached through a symlink out of the model's folder ("External data
/// path escapes model directory"), which is every file of a Hugging Face cache snapshot (links
/// into `blobs/`): then each data file is named by its target, in the targets' folder.
fn follow_linked_data<'a>(model: &'a [u8], dir: &Path) -> Result<(std::borrow::Cow<'a, [u8]>, PathBuf)> {
    use std::borrow::Cow;
    let locations = super::proto::external_locations(model)?;
    let home = dir.canonicalize().with_context(|| format!("reading {}", dir.display()))?;
    let mut targets = Vec::new();
    for location in &locations {
        let path = dir.join(location);
        targets.push(path.canonicalize().with_context(|| format!("reading {}", path.display()))?);
    }
    if targets.iter().all(|t| t.starts_with(&home)) {
        return Ok((Cow::Borrowed(model), dir.to_path_buf()));
    }
    let folder = targets[0].parent().map(Path::to_path_buf).unwrap_or_default();
    if let Some(other) = targets.iter().find(|t| t.parent() != Some(folder.as_path())) {
        bail!(
            "the model's external data files are links into different folders ({} and {}); ONNX Runtime reads them \
             from one folder",
            folder.display(),
            other.display()
        );
    }
    let renamed = super::proto::rename_locations(model, &mut |location| {
        let index = locations.iter().position(|l| l == location)?;
        targets[index].file_name().map(|n| n.to_string_lossy().into_owned())
    })?;
    log::info!("the model's external data is linked from {}: read from there", folder.display());
    Ok((Cow::Owned(renamed), folder))
}

fn builder(options: &RuntimeOptions) -> Result<ort::session::builder::SessionBuilder> {
    let loaded =
        ENVIRONMENT.get().and_then(|r| r.as_ref().ok()).ok_or_else(|| anyhow::anyhow!("ONNX Runtime is not loaded"))?;
    let session = Session::builder(&loaded.1)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(ort::Error::<()>::from)?
        .with_intra_threads(options.intra_threads.max(1))
        .map_err(ort::Error::<()>::from)?
        .with_inter_threads(1)
        .map_err(ort::Error::<()>::from)?
        .with_intra_op_spinning(options.spin)
        .map_err(ort::Error::<()>::from)?
        .with_log_level(ort::logging::LogLevel::Warning)
        .map_err(ort::Error::<()>::from)?;
    let gpu = match options.provider {
        Provider::Cpu => None,
        Provider::Cuda(device) => Some(ort::ep::CUDA::default().with_device_id(device).build()),
        Provider::TensorRt(device) => Some(ort::ep::TensorRT::default().with_device_id(device).build()),
    };
    Ok(match gpu {
        None => session,
        Some(ep) => session.with_execution_providers([ep.error_on_failure()]).map_err(|e| {
            anyhow::anyhow!(
                "the {} execution provider could not be registered ({e}); it needs a GPU build of ONNX Runtime \
                 (e.g. the onnxruntime-gpu wheel's libonnxruntime.so, via --onnxruntime) with its CUDA/cuDNN \
                 (and TensorRT) libraries installed",
                options.provider
            )
        })?,
    })
}
