//! DynamoDB throttling (issue 11): the functions' DynamoDB client retries a throttled call with
//! the SDK's standard retry (3 attempts, shared/src/dynamo.rs), then the store answers the
//! contract's 503. The client is the real one (`store-probe` binary, which uses
//! `shared::dynamo::client`), pointed at a fake DynamoDB on loopback that throttles every call.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const THROTTLED: &str = r#"{"__type":"com.amazonaws.dynamodb.v20120810#ThrottlingException","message":"Rate of requests exceeds the allowed throughput."}"#;

/// Answers every request with DynamoDB's throttling error and counts them.
async fn throttling_dynamodb() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(socket);
                loop {
                    // One HTTP/1.1 request: headers up to the blank line, then the body.
                    let mut length = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    let response = format!(
                        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/x-amz-json-1.0\r\n\
                         x-amzn-requestid: throttled\r\ncontent-length: {}\r\n\r\n{THROTTLED}",
                        THROTTLED.len()
                    );
                    if reader
                        .get_mut()
                        .write_all(response.as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, calls)
}

#[tokio::test]
async fn throttled_dynamodb_is_retried_by_the_sdk_then_a_503() {
    let (endpoint, calls) = throttling_dynamodb().await;
    let probe = tokio::process::Command::new(env!("CARGO_BIN_EXE_store_probe"))
        .env("AWS_ENDPOINT_URL_DYNAMODB", &endpoint)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "probe")
        .env("AWS_SECRET_ACCESS_KEY", "probe")
        .env_remove("AWS_PROFILE")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), probe)
        .await
        .expect("the probe hung")
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["status"], 503, "{result}");
    assert_eq!(result["code"], "service_unavailable", "{result}");
    assert_eq!(result["message"], "DynamoDB is unavailable", "{result}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the SDK's standard retry makes 3 attempts: {result}"
    );
    assert!(
        result["elapsed_ms"].as_u64().is_some_and(|ms| ms < 5_000),
        "throttling must not take longer than the operation timeout: {result}"
    );
}
