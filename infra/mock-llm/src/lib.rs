//! A deterministic OpenAI-compatible server for tests and benchmarks.
//!
//! Replies are computed from the request alone, and latency and failures are chosen per request,
//! so a test states the upstream behaviour it needs inside the request it sends.
//!
//! Options (see [`options`]), later sources overriding earlier ones: the model id
//! `mock-fault-<kind>`, then `x-mock-<option>` headers, then `[mock k=v ...]` directives in
//! message content. Names: `fault` (`429`, `500`, `502`, `503`, `hang`, `cut`, `malformed`,
//! `context`, `none`), `times`, `key`, `retry_after`, `hang_ms`, `cut_after`, `tokens`,
//! `ttft_ms`, `token_ms`, `latency_ms`; `-` and `_` are interchangeable.
//!
//! Introspection: `GET /mock/stats` (request counts; chat-completion requests `in_flight` now
//! and at their `peak_in_flight`, also `peak_in_flight_by_key` for requests that named a `key`;
//! and `streams_cancelled`: streamed answers whose client went away before the end, also
//! `streams_cancelled_by_key`), `GET /mock/requests?limit=N`, `POST /mock/reset`,
//! `GET /health`.

mod chat;
pub mod cli;
pub mod openai;
pub mod options;
pub mod reply;
pub mod server;
pub mod state;

pub use server::{app, run, serve};
pub use state::MockState;
