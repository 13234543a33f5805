use std::ffi::c_char;

use crate::api::ApiError;
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

impl chat_status {
    pub(super) fn describe(self) -> &'static std::ffi::CStr {
        match self {
            CHAT_OK => c"ok",
            CHAT_INVALID_ARGUMENT => c"invalid argument",
            CHAT_INVALID_CONFIG => c"invalid configuration",
            CHAT_RUNTIME_MISSING => c"ONNX Runtime missing",
            CHAT_MODEL_LOAD_FAILED => c"model load failed",
            CHAT_INVALID_REQUEST => c"invalid request",
            CHAT_MODEL_NOT_FOUND => c"model not found",
            CHAT_CONTEXT_LENGTH_EXCEEDED => c"context length exceeded",
            CHAT_OVERLOADED => c"overloaded",
            CHAT_TIMEOUT => c"timeout",
            CHAT_CANCELLED => c"cancelled",
            CHAT_UNAVAILABLE => c"unavailable",
            CHAT_INTERNAL => c"internal error",
            CHAT_PANIC => c"panic",
        }
    }

    pub(super) fn as_ptr(self) -> *const c_char {
        self.describe().as_ptr()
    }
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
        let status = match (e.status, e.code) {
            (_, Some("context_length_exceeded")) => CHAT_CONTEXT_LENGTH_EXCEEDED,
            (400 | 413, _) => CHAT_INVALID_REQUEST,
            (404, _) => CHAT_MODEL_NOT_FOUND,
            (429, _) => CHAT_OVERLOADED,
            (503, _) => CHAT_UNAVAILABLE,
            (504, _) => CHAT_TIMEOUT,
            _ => CHAT_INTERNAL,
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
