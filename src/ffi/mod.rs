//! libchat: the engine behind a C ABI. `include/libchat.h` is generated from this module by
//! cbindgen (`scripts/gen-header.sh`; a test fails when the committed header is stale).
//!
//! Every exported function runs inside `boundary::guard`, so no panic unwinds into C; every
//! pointer is checked for NULL; outputs are written only on `CHAT_OK`. Requests go through
//! [`Service::call`], the code path the HTTP server uses, so both accept the same JSON and fail
//! with the same classes of error.

mod boundary;
mod status;

use std::ffi::{CString, c_char, c_int, c_void};
use std::sync::{Condvar, Mutex};

use boundary::{arg, arg_str, guard, guard_or, out};
use status::Failure;
pub use status::chat_status;

use crate::api::Endpoint;
use crate::config::Config;
use crate::service::Service;

/// An engine: one loaded model, its scheduler and batching. Created by `chat_engine_new`,
/// released by `chat_engine_free`. Shareable: any number of threads may call the functions
/// that take a `const chat_engine *` at once; their requests are scheduled and batched
/// together and get independent answers.
#[allow(non_camel_case_types)]
pub struct chat_engine {
    service: Service,
    /// Calls in progress, so that `chat_engine_free` can wait for them.
    calls: Mutex<usize>,
    idle: Condvar,
}

/// Counts a call in progress until dropped.
struct Call<'a>(&'a chat_engine);

impl chat_engine {
    fn enter(&self) -> Call<'_> {
        *self.calls.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        Call(self)
    }

    /// Answers `request`. The caller writes the response out once every borrow of the
    /// caller's memory has ended, so an output pointer into the request is no aliasing.
    fn call(
        &self,
        endpoint: Endpoint,
        request: &str,
        on_text: Option<&mut dyn FnMut(&str) -> bool>,
    ) -> Result<CString, Failure> {
        let _call = self.enter();
        let response = self.service.call(endpoint, request.as_bytes(), on_text)?;
        CString::new(response.to_string())
            .map_err(|_| Failure::new(chat_status::CHAT_INTERNAL, "the response held a NUL byte"))
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        let mut calls = self.0.calls.lock().unwrap_or_else(|e| e.into_inner());
        *calls -= 1;
        if *calls == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// Called with each new piece of a streamed answer, on the thread that called
/// `chat_engine_chat_stream` and before that call returns. `text` is `len` bytes of UTF-8
/// (never a split character), NUL-terminated, valid only during the callback. Return true to
/// go on, false to cancel the request.
#[allow(non_camel_case_types)]
pub type chat_delta_fn = Option<unsafe extern "C" fn(userdata: *mut c_void, text: *const c_char, len: usize) -> CBool>;

/// A C `bool` coming back from C, read as the byte it is passed in, so that no value a callback
/// returns (2, say, from a function declared to return `int` or `char`) is undefined behaviour
/// in Rust: 0 is false, anything else true. The header spells it `bool` (cbindgen.toml).
#[repr(transparent)]
#[derive(Clone, Copy)]
pub struct CBool(u8);

impl CBool {
    fn is_true(self) -> bool {
        self.0 != 0
    }
}

/// Loads a model and starts an engine.
///
/// `config_json` is a JSON object with the daemon's settings, each keyed by its flag (with `-` or
/// `_`; `chatd --help` and the README's Configuration table list them with their defaults), for
/// example `{"model": "/opt/models/smollm2", "threads": 2, "max_running": 4}`.
/// "model" is required. The daemon's environment variables are not read, and libchat logs to
/// stderr only when "log_level" is given. Server-only settings ("listen", "http_threads", ...)
/// are accepted and unused. Values may be strings, numbers or booleans. ONNX Runtime is loaded
/// once per process: the first engine's "onnxruntime" decides (else ORT_DYLIB_PATH, a copy next
/// to libchat.so or in ../lib/chatd, then the system library path).
///
/// On CHAT_OK, `*engine_out` is a new engine owned by the caller, to be released with
/// `chat_engine_free`. Fails with CHAT_INVALID_ARGUMENT (NULL), CHAT_INVALID_CONFIG,
/// CHAT_RUNTIME_MISSING or CHAT_MODEL_LOAD_FAILED.
///
/// # Safety
/// `config_json` is NULL or a NUL-terminated string; `engine_out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn chat_engine_new(config_json: *const c_char, engine_out: *mut *mut chat_engine) -> chat_status {
    guard(|| {
        // SAFETY: per this function's contract.
        let text = unsafe { arg_str(config_json, "config_json") }?;
        let engine_out = out(engine_out, "engine_out")?;
        let config = Config::from_json(text).map_err(|e| Failure::new(chat_status::CHAT_INVALID_CONFIG, e))?;
        if let Ok(serde_json::Value::Object(settings)) = serde_json::from_str::<serde_json::Value>(text)
            && (settings.contains_key("log_level") || settings.contains_key("log-level"))
        {
            let _ = env_logger::Builder::new()
                .parse_filters(&format!("{},ort=warn", config.log_level))
                .format_timestamp_millis()
                .try_init();
        }
        let service = Service::load(&config)?;
        let engine = Box::new(chat_engine { service, calls: Mutex::new(0), idle: Condvar::new() });
        // SAFETY: checked non-NULL above.
        unsafe { *engine_out = Box::into_raw(engine) };
        Ok(())
    })
}

/// Releases an engine. Calls already in progress on other threads are waited for (they
/// finish normally); no call may start once `chat_engine_free` has been called (the caller
/// must order its threads so; a binding that frees from any thread should count its own calls). The engine's
/// threads and memory are gone when it returns. NULL is a no-op.
///
/// # Safety
/// `engine` is NULL or was returned by `chat_engine_new` and not freed before.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn chat_engine_free(engine: *mut chat_engine) {
    guard_or((), || {
        if engine.is_null() {
            return;
        }
        {
            // SAFETY: a live engine, per the contract; shared with calls still in progress.
            let shared = unsafe { &*engine };
            let mut calls = shared.calls.lock().unwrap_or_else(|e| e.into_inner());
            while *calls > 0 {
                calls = shared.idle.wait(calls).unwrap_or_else(|e| e.into_inner());
            }
        }
        // SAFETY: no call holds the engine any more, and it came from Box::into_raw.
        drop(unsafe { Box::from_raw(engine) });
    })
}

/// Answers an OpenAI chat-completions request and blocks until it is complete.
///
/// `request_json` is exactly what `POST /v1/chat/completions` accepts (`stream` is ignored).
/// On CHAT_OK, `*response_json_out` is the `chat.completion` object (with `usage` and each
/// choice's `finish_reason`), owned by the caller and released with `chat_string_free`.
/// Errors map to the HTTP API's: CHAT_INVALID_REQUEST (400), CHAT_CONTEXT_LENGTH_EXCEEDED,
/// CHAT_MODEL_NOT_FOUND (404), CHAT_OVERLOADED (429), CHAT_TIMEOUT (504), CHAT_UNAVAILABLE,
/// CHAT_INTERNAL; `chat_last_error` has the message.
///
/// # Safety
/// `engine` is NULL or a live engine; `request_json` is NULL or a NUL-terminated string;
/// `response_json_out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn chat_engine_chat(
    engine: *const chat_engine,
    request_json: *const c_char,
    response_json_out: *mut *mut c_char,
) -> chat_status {
    // SAFETY: per this function's contract.
    unsafe { blocking(Endpoint::Chat, engine, request_json, response_json_out) }
}

/// The body of the blocking calls.
///
/// # Safety
/// As `chat_engine_chat`.
unsafe fn blocking(
    endpoint: Endpoint,
    engine: *const chat_engine,
    request_json: *const c_char,
    response_json_out: *mut *mut c_char,
) -> chat_status {
    guard(|| {
        // SAFETY: per this function's contract.
        let (engine, request) = unsafe { (arg(engine, "engine")?, arg_str(request_json, "request_json")?) };
        let response_json_out = out(response_json_out, "response_json_out")?;
        let response = engine.call(endpoint, request, None)?;
        // SAFETY: checked non-NULL and writable per the contract; written only on success.
        unsafe { *response_json_out = response.into_raw() };
        Ok(())
    })
}

/// As `chat_engine_chat`, handing each new piece of text to `on_delta` as it is generated.
/// If `on_delta` returns false the request is cancelled and the call returns CHAT_CANCELLED
/// (no response). Streaming delivers one choice: a request with `n` > 1 is
/// CHAT_INVALID_REQUEST. `userdata` is passed to `on_delta` untouched. A NULL `on_delta` is
/// CHAT_INVALID_ARGUMENT. Cancelling takes effect at the next piece: a request still queued
/// or reading its prompt runs until its first piece.
///
/// # Safety
/// As `chat_engine_chat`; `on_delta` is safe to call with `userdata` and must return
/// normally: a C++ exception or longjmp out of it would unwind through libchat (undefined
/// behaviour), so catch inside and return false.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn chat_engine_chat_stream(
    engine: *const chat_engine,
    request_json: *const c_char,
    on_delta: chat_delta_fn,
    userdata: *mut c_void,
    response_json_out: *mut *mut c_char,
) -> chat_status {
    guard(|| {
        // SAFETY: per this function's contract.
        let (engine, request) = unsafe { (arg(engine, "engine")?, arg_str(request_json, "request_json")?) };
        let on_delta =
            on_delta.ok_or_else(|| Failure::new(chat_status::CHAT_INVALID_ARGUMENT, "`on_delta` is NULL"))?;
        let response_json_out = out(response_json_out, "response_json_out")?;
        let mut buffer = Vec::new();
        let mut deliver = |text: &str| {
            buffer.clear();
            buffer.extend_from_slice(text.as_bytes());
            buffer.push(0);
            // SAFETY: the callback's contract; the buffer outlives the call.
            unsafe { on_delta(userdata, buffer.as_ptr().cast(), text.len()) }.is_true()
        };
        let response = engine.call(Endpoint::Chat, request, Some(&mut deliver))?;
        // SAFETY: checked non-NULL and writable per the contract; written only on success.
        unsafe { *response_json_out = response.into_raw() };
        Ok(())
    })
}

/// As `chat_engine_chat` for the legacy completions API: `request_json` is what
/// `POST /v1/completions` accepts (a raw `prompt`, no chat template), the response a
/// `text_completion` object.
///
/// # Safety
/// As `chat_engine_chat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn chat_engine_complete(
    engine: *const chat_engine,
    request_json: *const c_char,
    response_json_out: *mut *mut c_char,
) -> chat_status {
    // SAFETY: per this function's contract.
    unsafe { blocking(Endpoint::Completion, engine, request_json, response_json_out) }
}

/// Releases a string returned by libchat. NULL is a no-op. Never pass it to `free()`.
///
/// # Safety
/// `s` is NULL or a string returned by libchat and not released before.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn chat_string_free(s: *mut c_char) {
    guard_or((), || {
        if !s.is_null() {
            // SAFETY: it came from CString::into_raw, per the contract.
            drop(unsafe { CString::from_raw(s) });
        }
    })
}

/// Copies the calling thread's last error message (empty after a successful call) into
/// `buf`, truncated to `len - 1` bytes and NUL-terminated, and returns its full length in
/// bytes (without the NUL), so a caller can retry with a larger buffer. With `buf` NULL or
/// `len` 0 it only returns the length.
///
/// # Safety
/// `buf` is NULL or writable for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn chat_last_error(buf: *mut c_char, len: usize) -> usize {
    guard_or(0, || {
        let message = boundary::last_error();
        if !buf.is_null() && len > 0 {
            let mut n = message.len().min(len - 1);
            while !message.is_char_boundary(n) {
                n -= 1;
            }
            // SAFETY: `buf` holds `len` > n bytes, per the contract.
            unsafe {
                std::ptr::copy_nonoverlapping(message.as_ptr(), buf.cast::<u8>(), n);
                *buf.add(n) = 0;
            }
        }
        message.len()
    })
}

/// A static, NUL-terminated description of `status` ("ok", "invalid request", ...), and
/// "unknown status" for any value that is no `chat_status` (say, one from a newer header);
/// never to be freed. Takes an `int` so that every value C can pass is defined.
#[unsafe(no_mangle)]
pub extern "C" fn chat_status_str(status: c_int) -> *const c_char {
    guard_or(c"unknown status".as_ptr(), || status::describe(status))
}

/// libchat's version, e.g. "0.1.0" (static; never to be freed). The header's
/// LIBCHAT_VERSION_* macros give the version a program was compiled against.
#[unsafe(no_mangle)]
pub extern "C" fn chat_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}
