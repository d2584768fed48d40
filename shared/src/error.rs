//! The one error type of the API surface and its JSON envelope.
//!
//! Handlers and services return [`ApiError`]; [`ApiError::status`] is an exhaustive match, and
//! [`IntoResponse`] renders the envelope in exactly one place. Internal details are logged, never
//! rendered, so no stack, table name or upstream body reaches a client.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// One field that failed validation, in the FastAPI-style shape clients already parse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    /// Path to the offending value, e.g. `["body", "message"]`.
    pub loc: Vec<String>,
    pub msg: String,
    #[serde(rename = "type")]
    pub kind: String,
}

impl FieldError {
    pub fn body(field: &str, kind: &str, msg: impl Into<String>) -> Self {
        Self::at("body", field, kind, msg)
    }

    /// A failing query-string parameter or path segment (`place` is `query` or `path`).
    pub fn at(place: &str, field: &str, kind: &str, msg: impl Into<String>) -> Self {
        let mut loc = vec![place.to_owned()];
        loc.extend(
            field
                .split('.')
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        );
        Self {
            loc,
            msg: msg.into(),
            kind: kind.to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, an unknown field, or a request the route cannot serve.
    #[error("{message}")]
    BadRequest {
        code: &'static str,
        message: String,
        param: Option<String>,
    },
    #[error("request validation failed")]
    Validation(Vec<FieldError>),
    /// One generic message for every credential failure, so responses do not tell an attacker
    /// which check failed.
    #[error("missing or invalid credentials")]
    Unauthorized,
    /// Unknown, or owned by someone else: deliberately indistinguishable.
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    #[error("rate limit exceeded: {message}")]
    RateLimited {
        message: String,
        /// The quota that was exhausted, for `X-RateLimit-Limit`.
        limit: u64,
        retry_after_secs: u64,
    },
    #[error("upstream model provider is rate limiting requests")]
    UpstreamRateLimited { retry_after_secs: Option<u64> },
    #[error("upstream model provider timed out")]
    UpstreamTimeout,
    #[error("upstream model provider failed")]
    UpstreamFailed { detail: String },
    #[error("{dependency} is unavailable")]
    Unavailable {
        dependency: &'static str,
        detail: String,
    },
    #[error("internal error")]
    Internal { detail: String },
}

/// The wire shape: `{"error": {...}}`, OpenAI-compatible so OpenAI SDKs raise their usual errors.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub request_id: Option<String>,
    /// Present on 422 only: every field that failed validation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<FieldError>>,
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
            param: None,
        }
    }

    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Self::Internal {
            detail: detail.to_string(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RateLimited { .. } | Self::UpstreamRateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `type` of the envelope, following OpenAI's vocabulary.
    fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest { .. }
            | Self::Validation(_)
            | Self::NotFound(_)
            | Self::MethodNotAllowed
            | Self::PayloadTooLarge { .. }
            | Self::UnsupportedMediaType => "invalid_request_error",
            Self::Unauthorized => "authentication_error",
            Self::RateLimited { .. } | Self::UpstreamRateLimited { .. } => "rate_limit_error",
            Self::UpstreamFailed { .. } | Self::UpstreamTimeout => "upstream_error",
            Self::Unavailable { .. } => "service_unavailable",
            Self::Internal { .. } => "api_error",
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. } => code,
            Self::Validation(_) => "validation_failed",
            Self::Unauthorized => "invalid_credentials",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::RateLimited { .. } => "rate_limit_exceeded",
            Self::UpstreamRateLimited { .. } => "upstream_rate_limited",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamFailed { .. } => "upstream_error",
            Self::Unavailable { .. } => "service_unavailable",
            Self::Internal { .. } => "internal_error",
        }
    }

    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            // Upstream did not say: a short, honest hint beats none for SDK backoff.
            Self::UpstreamRateLimited { retry_after_secs } => Some(retry_after_secs.unwrap_or(1)),
            Self::Unavailable { .. } => Some(1),
            _ => None,
        }
    }

    /// The envelope for this error, stamped with the current request id.
    pub fn envelope(&self) -> ErrorEnvelope {
        let (param, details) = match self {
            Self::BadRequest { param, .. } => (param.clone(), None),
            Self::Validation(fields) => (
                fields
                    .first()
                    .map(|f| f.loc.iter().skip(1).cloned().collect::<Vec<_>>().join(".")),
                Some(fields.clone()),
            ),
            _ => (None, None),
        };
        let message = match self {
            Self::Validation(fields) => {
                let names: Vec<String> = fields
                    .iter()
                    .map(|f| f.loc.iter().skip(1).cloned().collect::<Vec<_>>().join("."))
                    .collect();
                format!("request validation failed: {}", names.join(", "))
            }
            other => other.to_string(),
        };
        ErrorEnvelope {
            error: ErrorBody {
                kind: self.kind(),
                code: self.code(),
                message,
                param,
                request_id: crate::http::current_request_id(),
                details,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            Self::Internal { detail } => {
                tracing::error!(code = self.code(), %detail, "internal error")
            }
            Self::UpstreamFailed { detail } | Self::Unavailable { detail, .. } => {
                tracing::warn!(code = self.code(), %detail, "dependency failure");
            }
            _ => {}
        }
        let mut response = (status, Json(self.envelope())).into_response();
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after_secs() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Self::RateLimited {
            limit,
            retry_after_secs,
            ..
        } = &self
        {
            headers.insert(crate::ratelimit::LIMIT_HEADER, HeaderValue::from(*limit));
            headers.insert(crate::ratelimit::REMAINING_HEADER, HeaderValue::from(0u64));
            headers.insert(
                crate::ratelimit::RESET_HEADER,
                HeaderValue::from(*retry_after_secs),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use http_body_util::BodyExt;

    fn every_variant() -> Vec<(ApiError, u16, &'static str, &'static str)> {
        vec![
            (
                ApiError::bad_request("invalid_json", "bad json"),
                400,
                "invalid_request_error",
                "invalid_json",
            ),
            (
                ApiError::Validation(vec![FieldError::body("message", "too_short", "empty")]),
                422,
                "invalid_request_error",
                "validation_failed",
            ),
            (
                ApiError::Unauthorized,
                401,
                "authentication_error",
                "invalid_credentials",
            ),
            (
                ApiError::NotFound("conversation"),
                404,
                "invalid_request_error",
                "not_found",
            ),
            (
                ApiError::MethodNotAllowed,
                405,
                "invalid_request_error",
                "method_not_allowed",
            ),
            (
                ApiError::PayloadTooLarge { limit: 10 },
                413,
                "invalid_request_error",
                "payload_too_large",
            ),
            (
                ApiError::UnsupportedMediaType,
                415,
                "invalid_request_error",
                "unsupported_media_type",
            ),
            (
                ApiError::RateLimited {
                    message: "requests per hour".into(),
                    limit: 100,
                    retry_after_secs: 42,
                },
                429,
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            (
                ApiError::UpstreamRateLimited {
                    retry_after_secs: Some(7),
                },
                429,
                "rate_limit_error",
                "upstream_rate_limited",
            ),
            (
                ApiError::UpstreamTimeout,
                504,
                "upstream_error",
                "upstream_timeout",
            ),
            (
                ApiError::UpstreamFailed {
                    detail: "secret upstream body".into(),
                },
                502,
                "upstream_error",
                "upstream_error",
            ),
            (
                ApiError::Unavailable {
                    dependency: "DynamoDB",
                    detail: "table local-x gone".into(),
                },
                503,
                "service_unavailable",
                "service_unavailable",
            ),
            (
                ApiError::internal("panic at table local-x"),
                500,
                "api_error",
                "internal_error",
            ),
        ]
    }

    async fn render(err: ApiError) -> (StatusCode, http::HeaderMap, serde_json::Value) {
        let response = err.into_response();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, headers, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn every_variant_maps_to_its_status_type_and_code() {
        for (err, status, kind, code) in every_variant() {
            let (got_status, _, body) = render(err).await;
            assert_eq!(got_status.as_u16(), status, "{body}");
            assert_eq!(body["error"]["type"], kind, "{body}");
            assert_eq!(body["error"]["code"], code, "{body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
            assert!(
                body["error"].get("param").is_some(),
                "param key always present"
            );
            assert!(
                body["error"].get("request_id").is_some(),
                "request_id key always present"
            );
        }
    }

    #[tokio::test]
    async fn internal_details_never_reach_the_client() {
        for err in [
            ApiError::internal("panic at table local-x"),
            ApiError::UpstreamFailed {
                detail: "secret upstream body".into(),
            },
            ApiError::Unavailable {
                dependency: "DynamoDB",
                detail: "table local-x gone".into(),
            },
        ] {
            let (_, _, body) = render(err).await;
            let text = body.to_string();
            assert!(
                !text.contains("local-x") && !text.contains("secret"),
                "{text}"
            );
        }
    }

    #[tokio::test]
    async fn rate_limited_errors_carry_retry_after() {
        let (_, headers, _) = render(ApiError::RateLimited {
            message: "x".into(),
            limit: 100,
            retry_after_secs: 42,
        })
        .await;
        assert_eq!(headers[header::RETRY_AFTER], "42");
        let (_, headers, _) = render(ApiError::UpstreamRateLimited {
            retry_after_secs: Some(7),
        })
        .await;
        assert_eq!(headers[header::RETRY_AFTER], "7");
        let (_, headers, _) = render(ApiError::UpstreamRateLimited {
            retry_after_secs: None,
        })
        .await;
        assert_eq!(headers[header::RETRY_AFTER], "1");
        let (_, headers, _) = render(ApiError::UpstreamTimeout).await;
        assert!(headers.get(header::RETRY_AFTER).is_none());
    }

    #[tokio::test]
    async fn validation_error_lists_details_with_locations() {
        let err = ApiError::Validation(vec![
            FieldError::body("message", "string_too_short", "message must not be empty"),
            FieldError::body("temperature", "range", "temperature must be within 0..=2"),
        ]);
        let (_, _, body) = render(err).await;
        let details = body["error"]["details"].as_array().unwrap();
        assert_eq!(details.len(), 2);
        assert_eq!(details[0]["loc"], serde_json::json!(["body", "message"]));
        assert_eq!(details[1]["type"], "range");
        assert_eq!(body["error"]["param"], "message");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("temperature")
        );
    }

    #[tokio::test]
    async fn non_validation_errors_have_no_details_key() {
        let (_, _, body) = render(ApiError::Unauthorized).await;
        assert!(body["error"].get("details").is_none());
    }
}
