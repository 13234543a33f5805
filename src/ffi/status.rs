use std::ffi::{CStr, c_char, c_int};

use crate::api::{ApiError, ErrorClass};
use crate::service::{CallError, LoadError};

/// The outcome of every fallible libchat call. A value names a class of failure; the message
/// for the calling thread is in `chat_last_error`. Values never change meaning: new classes
/// are appended.
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum chat_status {
    /// Success; output parameters were written.
    CHAT_OK = 0,
    /// A pointer argument was NULL, or a string was not UTF-8.
    CHAT_INVALID_ARGUMENT = 1,
    /// `config_json` is not valid JSON, names an unknown setting, or has a bad value.
    CHAT_INVALID_CONFIG = 2,
    /// ONNX Runtime could not be found or loaded (see the `onnxruntime` setting).
    CHAT_RUNTIME_MISSING = 3,
    /// The model folder is missing or its files could not be loaded.
    CHAT_MODEL_LOAD_FAILED = 4,
    /// The request is not valid JSON, or a field is missing, of the wrong type or out of range
    /// (HTTP 400).
    CHAT_INVALID_REQUEST = 5,
    /// The request's `model` is not the engine's model (HTTP 404).
    CHAT_MODEL_NOT_FOUND = 6,
    /// The prompt, or prompt plus `max_tokens`, does not fit the model's context (HTTP 400,
    /// code `context_length_exceeded`).
    CHAT_CONTEXT_LENGTH_EXCEEDED = 7,
    /// Too many requests are queued, or one waited too long for a place; retry later (HTTP 429).
    CHAT_OVERLOADED = 8,
    /// The request's deadline passed before it could start (HTTP 504).
    CHAT_TIMEOUT = 9,
    /// The streaming callback returned false.
    CHAT_CANCELLED = 10,
    /// The engine has stopped and takes no more requests (HTTP 503).
    CHAT_UNAVAILABLE = 11,
    /// The model run or text processing failed (HTTP 500).
    CHAT_INTERNAL = 12,
    /// libchat panicked; the message says where. The engine may still be usable.
    CHAT_PANIC = 13,
}

use chat_status::*;

/// The description of each status, at the index of its value.
const DESCRIPTIONS: [&CStr; CHAT_PANIC as usize + 1] = [
    c"ok",
    c"invalid argument",
    c"invalid configuration",
    c"ONNX Runtime missing",
    c"model load failed",
    c"invalid request",
    c"model not found",
    c"context length exceeded",
    c"overloaded",
    c"timeout",
    c"cancelled",
    c"unavailable",
    c"internal error",
    c"panic",
];

/// What a value C passes as a status means. C chooses the integer (a newer header, a cast, a
/// binding's `int`), so any value is taken; those that name no status get a fixed text.
pub(super) fn describe(value: c_int) -> *const c_char {
    usize::try_from(value).ok().and_then(|i| DESCRIPTIONS.get(i)).unwrap_or(&c"unknown status").as_ptr()
}

/// A failed call: its status and the message `chat_last_error` will return.
pub(super) struct Failure {
    pub status: chat_status,
    pub message: String,
}

impl Failure {
    pub fn new(status: chat_status, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }
}

impl From<ApiError> for Failure {
    /// The same classes as the HTTP statuses.
    fn from(e: ApiError) -> Self {
        // No wildcard: a new class must choose its status here.
        let status = match e.class {
            ErrorClass::ContextLength => CHAT_CONTEXT_LENGTH_EXCEEDED,
            ErrorClass::InvalidRequest
            | ErrorClass::ConstraintFailed
            | ErrorClass::TooLarge
            | ErrorClass::MethodNotAllowed
            | ErrorClass::NotFound
            | ErrorClass::Unauthorized
            | ErrorClass::UnsupportedMediaType
            | ErrorClass::RequestTimeout
            | ErrorClass::ClientClosed => CHAT_INVALID_REQUEST,
            ErrorClass::ModelNotFound => CHAT_MODEL_NOT_FOUND,
            ErrorClass::Overloaded => CHAT_OVERLOADED,
            ErrorClass::Unavailable => CHAT_UNAVAILABLE,
            ErrorClass::Timeout => CHAT_TIMEOUT,
            ErrorClass::Internal => CHAT_INTERNAL,
        };
        let message = match &e.param {
            Some(param) if !e.message.contains(param.as_str()) => format!("{} (param: {param})", e.message),
            _ => e.message,
        };
        Failure::new(status, message)
    }
}

impl From<CallError> for Failure {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Api(e) => e.into(),
            cancelled @ CallError::Cancelled { .. } => Failure::new(CHAT_CANCELLED, cancelled.to_string()),
        }
    }
}

impl From<LoadError> for Failure {
    fn from(e: LoadError) -> Self {
        let status = match e {
            LoadError::Config(_) => CHAT_INVALID_CONFIG,
            LoadError::Runtime(_) => CHAT_RUNTIME_MISSING,
            LoadError::Model(_) => CHAT_MODEL_LOAD_FAILED,
        };
        Failure::new(status, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_has_its_own_text_and_other_values_are_unknown() {
        // SAFETY: `describe` returns pointers to static NUL-terminated strings.
        let text = |v: c_int| unsafe { CStr::from_ptr(describe(v)) }.to_str().unwrap();
        assert_eq!(text(CHAT_OK as c_int), "ok");
        assert_eq!(text(CHAT_CONTEXT_LENGTH_EXCEEDED as c_int), "context length exceeded");
        assert_eq!(text(CHAT_PANIC as c_int), "panic");
        let known: std::collections::HashSet<&str> = (0..=CHAT_PANIC as c_int).map(text).collect();
        assert_eq!(known.len(), DESCRIPTIONS.len());
        for value in [-1, CHAT_PANIC as c_int + 1, 15, 1000, c_int::MIN, c_int::MAX] {
            assert_eq!(text(value), "unknown status");
        }
    }
}
