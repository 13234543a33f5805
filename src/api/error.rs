use serde_json::json;

/// An OpenAI error object with its HTTP status: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, message: message.into(), param: None, code: None }
    }

    /// 400: a value is missing, of the wrong type or out of range.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self { param: Some(param.into()), ..Self::new(400, "invalid_request_error", message) }
    }

    /// 400: the request's constraint ran out of its budget, or allowed nothing, while generating.
    pub fn constraint_failed(message: impl Into<String>) -> Self {
        Self { code: Some("constraint_failed"), ..Self::new(400, "invalid_request_error", message) }
    }

    /// 400: the body is not a JSON object.
    pub fn bad_json(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", message)
    }

    pub fn context_length(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            code: Some("context_length_exceeded"),
            ..Self::new(400, "invalid_request_error", message)
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(404, "invalid_request_error", format!("The model `{model}` does not exist."))
        }
    }

    pub fn not_found(path: &str) -> Self {
        Self { code: Some("not_found"), ..Self::new(404, "invalid_request_error", format!("Unknown route: {path}")) }
    }

    pub fn method_not_allowed(method: &str, path: &str, allowed: &str) -> Self {
        Self {
            code: Some("method_not_allowed"),
            ..Self::new(405, "invalid_request_error", format!("{method} is not allowed on {path}; use {allowed}"))
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self {
            code: Some("request_too_large"),
            ..Self::new(413, "invalid_request_error", format!("The request body is larger than {limit} bytes."))
        }
    }

    /// 401: no key, or a wrong one.
    pub fn unauthorized(had_key: bool) -> Self {
        let message = if had_key {
            "Incorrect API key provided. Send `Authorization: Bearer KEY` with a key this server accepts."
        } else {
            "You didn't provide an API key. Send `Authorization: Bearer KEY`."
        };
        Self { code: Some("invalid_api_key"), ..Self::new(401, "invalid_request_error", message) }
    }

    /// 415: a form-encoded body; the API takes JSON only.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self {
            code: Some("unsupported_media_type"),
            ..Self::new(
                415,
                "invalid_request_error",
                format!("The body is sent as {content_type:?}; send JSON (Content-Type: application/json)."),
            )
        }
    }

    /// 408: the body did not arrive in time.
    pub fn request_timeout() -> Self {
        Self {
            code: Some("request_timeout"),
            ..Self::new(408, "invalid_request_error", "The request body did not arrive in time.")
        }
    }

    /// The client closed its side of the connection before the answer; the request was
    /// cancelled. Sent as 400 in case it still reads (a half-close), logged as 499.
    pub fn client_closed() -> Self {
        Self {
            code: Some("client_closed_request"),
            ..Self::new(
                400,
                "invalid_request_error",
                "The connection was closed by the client before the answer; the request was cancelled.",
            )
        }
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self { code: Some("overloaded"), ..Self::new(429, "rate_limit_error", message) }
    }

    /// 504: the request's deadline passed before it could start.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self { code: Some("timeout"), ..Self::new(504, "server_error", message) }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self { code: Some("unavailable"), ..Self::new(503, "server_error", message) }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "server_error", message)
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

impl std::error::Error for ApiError {}
