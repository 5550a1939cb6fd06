//! Refusals in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the
//! HTTP status a client of OpenAI's API expects for each kind of mistake, so that client
//! libraries raise their usual exceptions (400 BadRequestError, 401 AuthenticationError,
//! 404 NotFoundError, 429 RateLimitError).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    /// The request parameter at fault, if one is.
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: the request cannot be served as sent (`param` names the field at fault).
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    /// 400 for a required field the request lacks.
    pub fn missing(param: &'static str) -> Self {
        ApiError {
            code: Some("missing_required_parameter"),
            ..Self::bad_request(format!("you must provide '{param}'"), Some(param))
        }
    }

    /// 400 for a field of the wrong type or out of range.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code: Some("invalid_value"),
            ..Self::bad_request(message, Some(param))
        }
    }

    /// 401: no API key, or the wrong one.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// 404: a model this server does not run, or a path it does not serve.
    pub fn not_found(message: impl Into<String>, code: &'static str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some(code),
        }
    }

    /// 429: every sequence slot is busy and the waiting queue is full.
    pub fn overloaded(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded"),
        }
    }

    /// 503: the server is stopping.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// 500: generation failed inside the engine (the message says why).
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The JSON body, also sent as a stream's last event when a stream fails midway.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}
