pub mod chat;
pub mod completions;
pub mod conversations;
pub mod models;

use axum::http::{HeaderMap, HeaderValue};

/// `X-Cache: HIT|MISS`, on every response that could have come from the cache.
pub fn cache_header(headers: &mut HeaderMap, hit: bool) {
    headers.insert(
        "x-cache",
        HeaderValue::from_static(if hit { "HIT" } else { "MISS" }),
    );
}
