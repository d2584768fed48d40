//! Keeps a function's Lambda runtime loop alive across a transient failure of the runtime API.
//!
//! `lambda_http`'s loop ends at the first transport error of its runtime API client (only its
//! concurrent mode retries). One such error was seen with `cargo lambda watch` after every few
//! streamed answers: the emulator closes the connection a streamed response used while the
//! client reuses it for the next `GET /next`, which then fails with `IncompleteMessage`. The
//! process exited, and nothing started it again, so every later request to the function hung.
//! Polling `/next` again is safe (nothing was received) and is what Lambda's own restart of a
//! crashed runtime would achieve, minus a cold start. A loop that keeps failing still ends.

use std::collections::VecDeque;
use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

/// At most this many restarts within [`RESTART_WINDOW`]; one more failure ends the process.
pub const MAX_RESTARTS: usize = 5;
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);
const RESTART_DELAY: Duration = Duration::from_millis(50);

/// Runs `run` (the runtime loop, e.g. `|| lambda_http::run_with_streaming_response(app.clone())`)
/// and starts it again when it fails, unless it failed [`MAX_RESTARTS`] times within
/// [`RESTART_WINDOW`] already.
pub async fn run_with_restarts<F, Fut, E>(mut run: F) -> Result<(), E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let mut restarts: VecDeque<Instant> = VecDeque::new();
    loop {
        let Err(err) = run().await else {
            return Ok(());
        };
        let now = Instant::now();
        while restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            restarts.pop_front();
        }
        if restarts.len() >= MAX_RESTARTS {
            tracing::error!(error = %err, restarts = restarts.len(), "the Lambda runtime loop keeps failing; exiting");
            return Err(err);
        }
        restarts.push_back(now);
        tracing::warn!(error = %err, "the Lambda runtime loop failed; polling for the next event again");
        tokio::time::sleep(RESTART_DELAY).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::cell::Cell;

    use super::*;

    #[tokio::test]
    async fn a_failed_loop_is_started_again_and_a_clean_end_ends() {
        let calls = Cell::new(0);
        let result: Result<(), String> = run_with_restarts(|| {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                if n < 3 {
                    Err(format!("IncompleteMessage {n}"))
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert_eq!(result, Ok(()));
        assert_eq!(calls.get(), 3);
    }

    #[tokio::test]
    async fn a_loop_that_keeps_failing_ends_with_its_error() {
        let calls = Cell::new(0);
        let result: Result<(), String> = run_with_restarts(|| {
            calls.set(calls.get() + 1);
            async { Err("runtime API gone".to_owned()) }
        })
        .await;
        assert_eq!(result, Err("runtime API gone".to_owned()));
        assert_eq!(calls.get(), MAX_RESTARTS + 1);
    }
}
