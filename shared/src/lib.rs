//! Library shared by every function of the gateway: configuration, the API error type, HTTP
//! layers, telemetry, auth, rate limits, conversation history, the response cache, batch jobs
//! and the LLM client.
//!
//! Nothing here depends on `lambda_http` request types: business logic is testable without
//! Lambda, and each function's `main.rs` only wires these pieces together.

pub mod auth;
pub mod cache;
pub mod chat;
pub mod config;
pub mod conversations;
pub mod dynamo;
pub mod error;
pub mod http;
pub mod jobs;
pub mod lambda;
pub mod llm;
pub mod openai_compat;
pub mod ratelimit;
pub mod secrets;
pub mod services;
pub mod telemetry;
pub mod tls;
pub mod tokens;

pub use config::Config;
pub use error::ApiError;
