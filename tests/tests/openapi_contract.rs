//! Each function's `/openapi.json` describes what the function really does (issue 11; these
//! are the classes of defects schemathesis found): parameters sit where they are read (query or
//! path), the answers of the shared layers (400/413/415/422 for a body, 401 for credentials) are
//! documented on every operation that can give them, and `text/event-stream` answers are
//! described as SSE events (a string `data` per event), not as the JSON inside them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use integration_tests::{FUNCTIONS, Stack};
use serde_json::Value;

#[tokio::test]
async fn every_operation_documents_where_its_parameters_are_and_what_the_shared_layers_answer() {
    let stack = Stack::require();
    let mut wrong = Vec::new();
    for function in FUNCTIONS {
        let doc = stack.openapi(function).await.unwrap();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let name = format!("{function} {method} {path}");
                let parameters = op["parameters"].as_array().cloned().unwrap_or_default();
                for parameter in &parameters {
                    let param = parameter["name"].as_str().unwrap_or_default();
                    let placed = parameter["in"].as_str().unwrap_or_default();
                    let templated = path.contains(&format!("{{{param}}}"));
                    if (placed == "path") != templated {
                        wrong.push(format!(
                            "{name}: parameter `{param}` is documented in {placed}"
                        ));
                    }
                }
                let statuses: Vec<&str> = op["responses"]
                    .as_object()
                    .map(|r| r.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                let mut need = Vec::new();
                if op.get("requestBody").is_some() {
                    need.extend(["400", "413", "415", "422"]);
                }
                if op.get("security").is_some() {
                    need.push("401");
                }
                for status in need {
                    if !statuses.contains(&status) {
                        wrong.push(format!("{name}: {status} is not documented"));
                    }
                }
                if let Some(sse) = op["responses"]["200"]["content"].get("text/event-stream") {
                    let schema = resolve(&doc, &sse["schema"]);
                    if schema["properties"]["data"]["type"] != "string" {
                        wrong.push(format!(
                            "{name}: text/event-stream is not described as SSE events: {schema}"
                        ));
                    }
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The schema a `$ref` points to (one level), or the schema itself.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str().and_then(|r| r.strip_prefix("#/")) {
        Some(pointer) => doc.pointer(&format!("/{pointer}")).unwrap_or(schema),
        None => schema,
    }
}
