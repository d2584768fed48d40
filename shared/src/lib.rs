//! Library shared by every function of the gateway: configuration, the API error type, HTTP
//! layers, telemetry, and (in later modules) auth, storage and the LLM client.
//!
//! Nothing here depends on `lambda_http` request types: business logic is testable without
//! Lambda, and each function's `main.rs` only wires these pieces together.

pub mod config;
pub mod error;
pub mod http;
pub mod telemetry;

pub use config::Config;
pub use error::ApiError;
