use serde_json::json;

/// What kind of failure an error is. Everything a client or a binding sees of the class is
/// derived here, each by one `match`: the HTTP status, the OpenAI `type` and `code` (and the C
/// ABI's `chat_status`, in `ffi::status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// A value is missing, of the wrong type or out of range; the body is not JSON.
    InvalidRequest,
    /// The request's constraint ran out of its budget, or allowed nothing, while generating.
    ConstraintFailed,
    /// The prompt and completion do not fit the model's context.
    ContextLength,
    ModelNotFound,
    NotFound,
    MethodNotAllowed,
    TooLarge,
    Unauthorized,
    UnsupportedMediaType,
    /// The body did not arrive in time.
    RequestTimeout,
    /// The client closed its side before the answer (sent as 400 in case it still reads, logged
    /// as 499).
    ClientClosed,
    Overloaded,
    /// The request's deadline passed before it could start.
    Timeout,
    Unavailable,
    Internal,
}

impl ErrorClass {
    pub fn status(self) -> u16 {
        match self {
            Self::InvalidRequest | Self::ConstraintFailed | Self::ContextLength | Self::ClientClosed => 400,
            Self::Unauthorized => 401,
            Self::ModelNotFound | Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::RequestTimeout => 408,
            Self::TooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::Overloaded => 429,
            Self::Internal => 500,
            Self::Unavailable => 503,
            Self::Timeout => 504,
        }
    }

    /// OpenAI's `type`.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Overloaded => "rate_limit_error",
            Self::Timeout | Self::Unavailable | Self::Internal => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// OpenAI's `code`.
    pub fn code(self) -> Option<&'static str> {
        match self {
            Self::InvalidRequest | Self::Internal => None,
            Self::ConstraintFailed => Some("constraint_failed"),
            Self::ContextLength => Some("context_length_exceeded"),
            Self::ModelNotFound => Some("model_not_found"),
            Self::NotFound => Some("not_found"),
            Self::MethodNotAllowed => Some("method_not_allowed"),
            Self::TooLarge => Some("request_too_large"),
            Self::Unauthorized => Some("invalid_api_key"),
            Self::UnsupportedMediaType => Some("unsupported_media_type"),
            Self::RequestTimeout => Some("request_timeout"),
            Self::ClientClosed => Some("client_closed_request"),
            Self::Overloaded => Some("overloaded"),
            Self::Timeout => Some("timeout"),
            Self::Unavailable => Some("unavailable"),
        }
    }
}

/// An OpenAI error object: `{"error": {"message", "type", "param", "code"}}`. Every error body
/// chatd sends is written here: the API's errors (`ApiError::to_json`) and the HTTP library's
/// own answers (malformed or oversize heads, too many connections).
pub fn error_json(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> serde_json::Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

/// An OpenAI error object of a class: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub class: ErrorClass,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self { class, message: message.into(), param: None }
    }

    pub fn status(&self) -> u16 {
        self.class.status()
    }

    /// 400: a value is missing, of the wrong type or out of range.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self { param: Some(param.into()), ..Self::new(ErrorClass::InvalidRequest, message) }
    }

    /// 400: the request's constraint ran out of its budget, or allowed nothing, while generating.
    pub fn constraint_failed(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::ConstraintFailed, message)
    }

    /// 400: the body is not a JSON object.
    pub fn bad_json(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::InvalidRequest, message)
    }

    pub fn context_length(param: &str, message: impl Into<String>) -> Self {
        Self { param: Some(param.into()), ..Self::new(ErrorClass::ContextLength, message) }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model".into()),
            ..Self::new(ErrorClass::ModelNotFound, format!("The model `{model}` does not exist."))
        }
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(ErrorClass::NotFound, format!("Unknown route: {path}"))
    }

    pub fn method_not_allowed(method: &str, path: &str, allowed: &str) -> Self {
        Self::new(ErrorClass::MethodNotAllowed, format!("{method} is not allowed on {path}; use {allowed}"))
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(ErrorClass::TooLarge, format!("The request body is larger than {limit} bytes."))
    }

    /// 401: no key, or a wrong one.
    pub fn unauthorized(had_key: bool) -> Self {
        let message = if had_key {
            "Incorrect API key provided. Send `Authorization: Bearer KEY` with a key this server accepts."
        } else {
            "You didn't provide an API key. Send `Authorization: Bearer KEY`."
        };
        Self::new(ErrorClass::Unauthorized, message)
    }

    /// 415: a form-encoded body; the API takes JSON only.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            ErrorClass::UnsupportedMediaType,
            format!("The body is sent as {content_type:?}; send JSON (Content-Type: application/json)."),
        )
    }

    /// 408: the body did not arrive in time.
    pub fn request_timeout() -> Self {
        Self::new(ErrorClass::RequestTimeout, "The request body did not arrive in time.")
    }

    /// The client closed its side of the connection before the answer; the request was
    /// cancelled. Sent as 400 in case it still reads (a half-close), logged as 499.
    pub fn client_closed() -> Self {
        Self::new(
            ErrorClass::ClientClosed,
            "The connection was closed by the client before the answer; the request was cancelled.",
        )
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Overloaded, message)
    }

    /// 504: the request's deadline passed before it could start.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Timeout, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Unavailable, message)
    }

    /// 500: the engine ended a request without a last event (its thread died).
    pub fn engine_dropped() -> Self {
        Self::internal("the engine dropped the request")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Internal, message)
    }

    pub fn to_json(&self) -> serde_json::Value {
        error_json(&self.message, self.class.kind(), self.param.as_deref(), self.class.code())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status(), self.message)
    }
}

impl std::error::Error for ApiError {}
