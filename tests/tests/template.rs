//! template.yaml checks that `sam validate --lint` does not make: invoke modes, binaries, the
//! least-privilege policies against what each function's code does, secrets, the schedule,
//! memory and timeouts, CORS, logs and outputs.
//!
//! These read files only (template.yaml, the workspace's sources, `cargo metadata`), so they need
//! no stack. That the tables the local stack creates match the template is checked against the
//! emulator in tests/tests/tables.rs.
//!
//! How "what a function's code uses" is found: the function crate's sources, with comments
//! and whitespace removed, are searched for the calls through which it reaches each table (the
//! chat service's turn methods, the stores, the limiter, the authenticated `Principal`; see
//! [`CAPABILITIES`]). Each capability names the DynamoDB actions the shared store performs for
//! it, and those actions are in turn checked against the SDK calls in the store's source, so a
//! store that starts making a new call, or a function that starts using a new store, fails
//! here until the policy says so.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use integration_tests::FUNCTIONS;
use integration_tests::template::{
    FUNCTION_TYPE, TABLE_TYPE, Template, get_att, intrinsic, ref_target,
    schedule_expression_problem, table_arn_target,
};
use serde_yaml::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// template.yaml of the workspace, or the one `GW_TEMPLATE` names (the local stack exports it;
/// pointing it at a modified copy shows what each check catches).
fn template() -> Template {
    let path =
        std::env::var_os("GW_TEMPLATE").map_or_else(|| root().join("template.yaml"), PathBuf::from);
    Template::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Logical id of the function whose `BuildProperties.Binary` is `binary`.
fn function_for(template: &Template, binary: &str) -> String {
    let found: Vec<String> = template
        .functions()
        .into_iter()
        .filter(|(id, _)| binary_of(template, id).as_deref() == Some(binary))
        .map(|(id, _)| id)
        .collect();
    match found.as_slice() {
        [one] => one.clone(),
        other => panic!("expected one function building binary `{binary}`, found {other:?}"),
    }
}

fn binary_of(template: &Template, logical_id: &str) -> Option<String> {
    let metadata = template.resource(logical_id)?.get("Metadata")?;
    Some(
        metadata
            .get("BuildProperties")?
            .get("Binary")?
            .as_str()?
            .to_owned(),
    )
}

fn text(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => "<missing>".to_owned(),
    }
}

fn number(value: Option<&Value>) -> Option<u64> {
    value.and_then(Value::as_u64)
}

// ------------------------------------------------------------------------------------------
// Invoke modes, binaries, runtime

#[test]
fn stream_is_the_only_response_streaming_function_url() {
    let template = template();
    for binary in FUNCTIONS {
        let id = function_for(&template, binary);
        let url = template
            .function_property(&id, "FunctionUrlConfig")
            .unwrap_or_else(|| panic!("{id} has no FunctionUrlConfig"));
        let expected = if binary == "stream" {
            "RESPONSE_STREAM"
        } else {
            "BUFFERED"
        };
        assert_eq!(text(url.get("InvokeMode")), expected, "{id} InvokeMode");
        // The functions authenticate every request themselves (JWT or API key).
        assert_eq!(text(url.get("AuthType")), "NONE", "{id} AuthType");
    }
}

#[test]
fn every_function_builds_a_binary_of_the_workspace() {
    let output = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(root())
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let binaries: BTreeSet<String> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.contains(&"bin".into()))
        })
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();

    let template = template();
    let functions = template.functions();
    assert_eq!(
        functions.len(),
        FUNCTIONS.len(),
        "one SAM function per binary"
    );
    for (id, _) in &functions {
        let resource = template.resource(id).unwrap();
        let metadata = resource.get("Metadata");
        assert_eq!(
            text(metadata.and_then(|m| m.get("BuildMethod"))),
            "rust-cargolambda",
            "{id} Metadata.BuildMethod"
        );
        let binary = binary_of(&template, id).unwrap_or_else(|| panic!("{id}: no Binary"));
        assert!(
            binaries.contains(&binary),
            "{id} builds `{binary}`, which no workspace package defines (bins: {binaries:?})"
        );
        assert!(
            FUNCTIONS.contains(&binary.as_str()),
            "{id} builds `{binary}`, not one of {FUNCTIONS:?}"
        );
        assert_eq!(
            text(template.function_property(id, "Runtime").as_ref()),
            "provided.al2023",
            "{id} Runtime"
        );
        assert_eq!(
            text(template.function_property(id, "Handler").as_ref()),
            "bootstrap",
            "{id} Handler"
        );
        let architectures = template
            .function_property(id, "Architectures")
            .and_then(|a| a.as_sequence().cloned())
            .unwrap_or_default();
        assert_eq!(
            architectures
                .iter()
                .filter_map(ref_target)
                .collect::<Vec<_>>(),
            ["Architecture"],
            "{id} Architectures must be the Architecture parameter"
        );
        assert_eq!(
            text(resource["Properties"].get("CodeUri")),
            ".",
            "{id} CodeUri"
        );
    }
    for binary in FUNCTIONS {
        function_for(&template, binary);
    }
    // arm64 for deployments, x86_64 selectable for SAM local on this kind of machine.
    let parameter = &template.root()["Parameters"]["Architecture"];
    assert_eq!(text(parameter.get("Default")), "arm64");
    let allowed: Vec<String> = parameter["AllowedValues"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| text(Some(v)))
        .collect();
    assert_eq!(allowed, ["arm64", "x86_64"]);
}

// ------------------------------------------------------------------------------------------
// Least privilege, derived from the code

/// Something a function's code does with a table, recognised by `markers` (searched in its
/// sources with comments and whitespace removed), and what the shared store needs for it.
struct Capability {
    what: &'static str,
    table: &'static str,
    markers: &'static [&'static str],
    actions: &'static [&'static str],
    /// A secondary index the store queries for it (`dynamodb:Query` on the index ARN).
    index: Option<&'static str>,
}

/// Calls of the chat service (shared/src/chat.rs) that run a whole completion or turn: each
/// admits (rate limits) and reads and writes the response cache.
const COMPLETIONS: &[&str] = &[
    "chat.chat(",
    "chat.complete(",
    "chat.begin_turn(",
    "chat.gate(",
];

const CAPABILITIES: &[Capability] = &[
    // ChatService::chat / begin_turn + finish_turn: the history query, the META read when a
    // turn conflicts, and the TransactWriteItems of Put (messages, new META) and Update (META).
    Capability {
        what: "conversation turns",
        table: "ConversationsTable",
        markers: &["chat.chat(", "chat.begin_turn(", "chat.finish_turn("],
        actions: &["GetItem", "Query", "PutItem", "UpdateItem"],
        index: None,
    },
    Capability {
        what: "reading a conversation",
        table: "ConversationsTable",
        markers: &["conversations.get("],
        actions: &["Query"],
        index: None,
    },
    Capability {
        what: "listing conversations",
        table: "ConversationsTable",
        markers: &["conversations.list("],
        actions: &[],
        index: Some("byOwner"),
    },
    // The guarded DeleteItem of META, the query for the messages, their batched deletion.
    Capability {
        what: "deleting a conversation",
        table: "ConversationsTable",
        markers: &["conversations.delete("],
        actions: &["DeleteItem", "Query", "BatchWriteItem"],
        index: None,
    },
    // One conditional UpdateItem per admission; settlements and releases are UpdateItems too.
    Capability {
        what: "rate limiting",
        table: "RateLimitsTable",
        markers: &[
            "chat.chat(",
            "chat.complete(",
            "chat.begin_turn(",
            "chat.gate(",
            ".limiter.",
            "admit_all(",
        ],
        actions: &["UpdateItem"],
        index: None,
    },
    // `GET /health?deep=true`: Services wires a DynamoProbe (DescribeTable) on RATE_LIMITS_TABLE.
    Capability {
        what: "the deep health probe",
        table: "RateLimitsTable",
        markers: &["Services::from_env(", "Services::from_config("],
        actions: &["DescribeTable"],
        index: None,
    },
    Capability {
        what: "the response cache",
        table: "CacheTable",
        markers: COMPLETIONS,
        actions: &["GetItem", "PutItem"],
        index: None,
    },
    Capability {
        what: "the response cache",
        table: "CacheTable",
        markers: &[".cache.get(", ".cache.put("],
        actions: &["GetItem", "PutItem"],
        index: None,
    },
    // Submission (PutItem META, BatchWriteItem items), status and results (GetItem, Query),
    // the drain's claims, renewals, releases and results (UpdateItem, transactions of Updates)
    // and its search for work on the byStatus index.
    Capability {
        what: "batch jobs",
        table: "JobsTable",
        markers: &["DynamoJobs::new("],
        actions: &[
            "GetItem",
            "PutItem",
            "BatchWriteItem",
            "Query",
            "UpdateItem",
        ],
        index: Some("byStatus"),
    },
    // Every authenticated handler extracts a Principal; an API key is looked up by its hash.
    Capability {
        what: "API key authentication",
        table: "ApiKeysTable",
        markers: &["Principal"],
        actions: &["GetItem"],
        index: None,
    },
];

/// Where each table's DynamoDB calls are made.
const STORE_SOURCES: &[(&str, &[&str])] = &[
    ("ConversationsTable", &["shared/src/conversations.rs"]),
    (
        "RateLimitsTable",
        &["shared/src/ratelimit.rs", "shared/src/dynamo.rs"],
    ),
    ("CacheTable", &["shared/src/cache.rs"]),
    ("JobsTable", &["shared/src/jobs.rs"]),
    ("ApiKeysTable", &["shared/src/auth/api_keys.rs"]),
];

/// Store calls no function makes, on purpose: they are not granted to any function.
const NOT_FOR_FUNCTIONS: &[(&str, &str, &str)] = &[
    (
        "ApiKeysTable",
        "PutItem",
        "keys are created by the admin CLI",
    ),
    (
        "ApiKeysTable",
        "UpdateItem",
        "keys are revoked by the admin CLI",
    ),
    (
        "RateLimitsTable",
        "GetItem",
        "RateLimitStore::current is for tests and tools",
    ),
];

/// SDK call (whitespace removed) -> the IAM action it needs. Transactions need the action of
/// each item they contain, so the item builders count as calls.
const SDK_CALLS: &[(&str, &str)] = &[
    (".get_item()", "GetItem"),
    (".put_item()", "PutItem"),
    ("Put::builder()", "PutItem"),
    (".update_item()", "UpdateItem"),
    ("Update::builder()", "UpdateItem"),
    (".delete_item()", "DeleteItem"),
    ("Delete::builder()", "DeleteItem"),
    ("ConditionCheck::builder()", "ConditionCheckItem"),
    (".query()", "Query"),
    (".scan()", "Scan"),
    (".batch_write_item()", "BatchWriteItem"),
    (".batch_get_item()", "BatchGetItem"),
    (".transact_get_items()", "GetItem"),
    (".describe_table()", "DescribeTable"),
];

/// Rust source without comments and whitespace, so chained calls split over lines match.
fn normalized(source: &str) -> String {
    source
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("//") {
                ""
            } else {
                // A trailing comment; `//` inside a string literal (a URL) is rare in these
                // sources and would only hide code after it on that line.
                line.split(" //").next().unwrap_or(line)
            }
        })
        .collect::<String>()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

fn rust_sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let source = std::fs::read_to_string(&path).unwrap();
                found.push((path, normalized(&source)));
            }
        }
    }
    found.sort();
    found
}

/// `(table, action)` and `(table, index)` a function needs, each with the reason found.
#[derive(Default, Debug)]
struct Needs {
    actions: BTreeMap<(String, String), String>,
    indexes: BTreeMap<(String, String), String>,
}

fn needs_of(binary: &str) -> Needs {
    let sources = rust_sources(&root().join("functions").join(binary).join("src"));
    let mut needs = Needs::default();
    for capability in CAPABILITIES {
        let hit = capability.markers.iter().find_map(|marker| {
            sources
                .iter()
                .find(|(_, source)| source.contains(marker))
                .map(|(path, _)| format!("{} (`{marker}` in {})", capability.what, path.display()))
        });
        let Some(reason) = hit else { continue };
        for action in capability.actions {
            needs
                .actions
                .entry((capability.table.to_owned(), (*action).to_owned()))
                .or_insert_with(|| reason.clone());
        }
        if let Some(index) = capability.index {
            needs
                .indexes
                .entry((capability.table.to_owned(), index.to_owned()))
                .or_insert_with(|| reason.clone());
            needs
                .actions
                .entry((capability.table.to_owned(), "Query".to_owned()))
                .or_insert_with(|| reason.clone());
        }
    }
    needs
}

/// What a function's inline policies grant on DynamoDB: `(table, action)` and
/// `(table, index)` for Query on an index ARN. Anything that is not a table or index ARN, or a
/// wildcard, fails the test.
#[derive(Default, Debug)]
struct Grants {
    actions: TablePairs,
    indexes: TablePairs,
}

fn as_list(value: Option<&Value>) -> Vec<Value> {
    match value {
        Some(Value::Sequence(items)) => items.clone(),
        Some(other) => vec![other.clone()],
        None => Vec::new(),
    }
}

fn grants_of(template: &Template, id: &str) -> Grants {
    let tables: BTreeSet<String> = template
        .resources_of_type(TABLE_TYPE)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let policies = template
        .function_property(id, "Policies")
        .and_then(|p| p.as_sequence().cloned())
        .unwrap_or_else(|| panic!("{id} has no Policies list"));
    let mut grants = Grants::default();
    for policy in &policies {
        // The secrets policy (a conditional reference to the managed policy) is checked by
        // `secrets_are_ssm_references_resolved_at_cold_start`.
        if intrinsic(policy, "If").is_some() {
            continue;
        }
        let statements = policy
            .get("Statement")
            .and_then(Value::as_sequence)
            .unwrap_or_else(|| {
                panic!("{id}: policy {policy:?} is not an inline `Statement:` document (no SAM policy templates: they grant more than the code uses)")
            });
        for statement in statements {
            assert_eq!(
                text(statement.get("Effect")),
                "Allow",
                "{id}: {statement:?}"
            );
            let actions: Vec<String> = as_list(statement.get("Action"))
                .iter()
                .map(|a| text(Some(a)))
                .collect();
            for action in &actions {
                assert!(
                    action.starts_with("dynamodb:") && !action.contains('*'),
                    "{id}: action `{action}` is not a single DynamoDB action"
                );
            }
            for resource in as_list(statement.get("Resource")) {
                let (table, index) = table_arn_target(&resource).unwrap_or_else(|| {
                    panic!(
                        "{id}: resource {resource:?} is not a table or index ARN of this template"
                    )
                });
                assert!(tables.contains(&table), "{id}: {table} is not a table");
                for action in &actions {
                    let action = action.trim_start_matches("dynamodb:").to_owned();
                    match &index {
                        None => {
                            grants.actions.insert((table.clone(), action));
                        }
                        Some(index) => {
                            assert_eq!(
                                action, "Query",
                                "{id}: only Query is used on {table}/index/{index}"
                            );
                            grants.indexes.insert((table.clone(), index.clone()));
                        }
                    }
                }
            }
        }
    }
    grants
}

#[test]
fn every_table_a_function_uses_is_in_its_policy_and_env() {
    let template = template();
    let config = normalized(&std::fs::read_to_string(root().join("shared/src/config.rs")).unwrap());
    let mut problems = Vec::new();
    for binary in FUNCTIONS {
        let id = function_for(&template, binary);
        let needs = needs_of(binary);
        let grants = grants_of(&template, &id);
        let env = template.function_env(&id);
        for ((table, action), reason) in &needs.actions {
            if !grants.actions.contains(&(table.clone(), action.clone())) {
                problems.push(format!(
                    "{id}: the code needs dynamodb:{action} on {table} for {reason}, the policy does not grant it"
                ));
            }
        }
        for ((table, index), reason) in &needs.indexes {
            if !grants.indexes.contains(&(table.clone(), index.clone())) {
                problems.push(format!(
                    "{id}: the code queries {table}/index/{index} for {reason}, the policy does not grant it"
                ));
            }
        }
        let used: BTreeSet<&String> = needs.actions.keys().map(|(t, _)| t).collect();
        for table in used {
            // The function learns the table's name from a variable that Config reads.
            let variable = env
                .iter()
                .find(|(_, value)| ref_target(value) == Some(table.as_str()))
                .map(|(name, _)| name.clone());
            match variable {
                Some(name) if config.contains(&format!("\"{name}\"")) => {}
                Some(name) => problems.push(format!(
                    "{id}: {name} (!Ref {table}) is not read by shared/src/config.rs"
                )),
                None => problems.push(format!(
                    "{id}: uses {table} but no environment variable is `!Ref {table}`"
                )),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn policies_grant_nothing_the_code_does_not_use() {
    let template = template();
    let mut problems = Vec::new();
    for binary in FUNCTIONS {
        let id = function_for(&template, binary);
        let needs = needs_of(binary);
        let grants = grants_of(&template, &id);
        for (table, action) in &grants.actions {
            if !needs.actions.contains_key(&(table.clone(), action.clone())) {
                problems.push(format!(
                    "{id}: grants dynamodb:{action} on {table}, which no code path of `{binary}` needs"
                ));
            }
        }
        for (table, index) in &grants.indexes {
            if !needs.indexes.contains_key(&(table.clone(), index.clone())) {
                problems.push(format!(
                    "{id}: grants Query on {table}/index/{index}, which `{binary}` never queries"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `(table, action)` or `(table, index)` pairs.
type TablePairs = BTreeSet<(String, String)>;

/// `(table, action)` of every SDK call in the stores' sources, and the indexes they query.
fn store_calls() -> (TablePairs, TablePairs) {
    let mut calls = BTreeSet::new();
    let mut indexes = BTreeSet::new();
    for (table, files) in STORE_SOURCES {
        for file in *files {
            let source = normalized(&std::fs::read_to_string(root().join(file)).unwrap());
            for (call, action) in SDK_CALLS {
                if source.contains(call) {
                    calls.insert(((*table).to_owned(), (*action).to_owned()));
                }
            }
            for piece in source.split(".index_name(\"").skip(1) {
                if let Some(name) = piece.split('"').next() {
                    indexes.insert(((*table).to_owned(), name.to_owned()));
                }
            }
        }
    }
    (calls, indexes)
}

#[test]
fn capabilities_match_the_calls_the_stores_make() {
    let (calls, indexes) = store_calls();
    let mut covered = BTreeSet::new();
    for capability in CAPABILITIES {
        for action in capability.actions {
            let key = (capability.table.to_owned(), (*action).to_owned());
            assert!(
                calls.contains(&key),
                "capability `{}` grants dynamodb:{action} on {}, but the store makes no such call",
                capability.what,
                capability.table
            );
            covered.insert(key);
        }
        if let Some(index) = capability.index {
            assert!(
                indexes.contains(&(capability.table.to_owned(), index.to_owned())),
                "capability `{}`: the store never queries index {index}",
                capability.what
            );
        }
    }
    for (table, action, _why) in NOT_FOR_FUNCTIONS {
        covered.insert(((*table).to_owned(), (*action).to_owned()));
    }
    let uncovered: Vec<_> = calls.difference(&covered).collect();
    assert!(
        uncovered.is_empty(),
        "store calls no capability accounts for (add them to CAPABILITIES, or to NOT_FOR_FUNCTIONS with the reason): {uncovered:?}"
    );
    let all_indexes: BTreeSet<_> = CAPABILITIES
        .iter()
        .filter_map(|c| c.index.map(|i| (c.table.to_owned(), i.to_owned())))
        .collect();
    let unknown: Vec<_> = indexes.difference(&all_indexes).collect();
    assert!(
        unknown.is_empty(),
        "indexes queried without a capability: {unknown:?}"
    );
}

#[test]
fn index_grants_name_indexes_the_tables_have() {
    let template = template();
    for binary in FUNCTIONS {
        let id = function_for(&template, binary);
        for (table, index) in grants_of(&template, &id).indexes {
            let properties = &template.resource(&table).unwrap()["Properties"];
            let names: Vec<String> = as_list(properties.get("GlobalSecondaryIndexes"))
                .iter()
                .map(|i| text(i.get("IndexName")))
                .collect();
            assert!(
                names.contains(&index),
                "{id}: {table} has no index {index} ({names:?})"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// Secrets

#[test]
fn secrets_are_ssm_references_resolved_at_cold_start() {
    let template = template();
    let parameters = &template.root()["Parameters"];
    for binary in FUNCTIONS {
        let id = function_for(&template, binary);
        let env = template.function_env(&id);
        let names: BTreeSet<&str> = env.iter().map(|(n, _)| n.as_str()).collect();
        for variable in shared::secrets::SECRET_VARIABLES {
            assert!(
                !names.contains(variable),
                "{id}: {variable} must never be a plain environment value"
            );
        }
        for (name, value) in &env {
            let Some(variable) = name.strip_suffix(shared::secrets::PARAM_SUFFIX) else {
                continue;
            };
            assert!(
                shared::secrets::SECRET_VARIABLES.contains(&variable),
                "{id}: {name} refers to no known secret"
            );
            // A reference to a parameter, possibly chosen by the JWT algorithm (`!If`).
            let refs = match intrinsic(value, "If").and_then(Value::as_sequence) {
                Some(branches) => branches[1..].to_vec(),
                None => vec![value.clone()],
            };
            for branch in refs {
                if branch.as_str() == Some("") {
                    continue;
                }
                let parameter = ref_target(&branch)
                    .unwrap_or_else(|| panic!("{id}: {name} is not a parameter reference"));
                assert_eq!(
                    text(parameters[parameter].get("Type")),
                    "String",
                    "{parameter}"
                );
                assert!(
                    text(parameters[parameter].get("AllowedPattern")).starts_with("^$|^(/"),
                    "{parameter} must be empty or an SSM parameter name starting with /"
                );
            }
        }
        for needed in ["OPENAI_API_KEY_PARAM", "JWT_SECRET_PARAM"] {
            assert!(names.contains(needed), "{id}: {needed} missing");
        }
        // The function can read them: the secrets policy is attached when one is configured.
        let policies = template.function_property(&id, "Policies").unwrap();
        let attached = policies.as_sequence().unwrap().iter().any(|p| {
            intrinsic(p, "If")
                .and_then(Value::as_sequence)
                .is_some_and(|b| {
                    text(b.first()) == "HasSecretParameters"
                        && ref_target(&b[1]) == Some("SecretsReadPolicy")
                })
        });
        assert!(attached, "{id}: SecretsReadPolicy is not attached");
        // And it resolves them: main.rs builds its services through the secrets loader.
        let main = normalized(
            &std::fs::read_to_string(root().join(format!("functions/{binary}/src/main.rs")))
                .unwrap(),
        );
        assert!(
            main.contains("Services::from_env(") || main.contains("secrets::load_config("),
            "functions/{binary}/src/main.rs must start through Services::from_env (or secrets::load_config) so *_PARAM references are resolved"
        );
    }

    // The policy grants GetParameters on exactly the configured parameters, nothing wider.
    let policy = template.resource("SecretsReadPolicy").unwrap();
    assert_eq!(text(policy.get("Type")), "AWS::IAM::ManagedPolicy");
    assert_eq!(text(policy.get("Condition")), "HasSecretParameters");
    let statements = policy["Properties"]["PolicyDocument"]["Statement"]
        .as_sequence()
        .unwrap();
    let read = &statements[0];
    assert_eq!(text(read.get("Action")), "ssm:GetParameters");
    for resource in as_list(read.get("Resource")) {
        let branches = intrinsic(&resource, "If")
            .and_then(Value::as_sequence)
            .unwrap();
        let arn = intrinsic(&branches[1], "Sub")
            .and_then(Value::as_str)
            .unwrap();
        assert!(
            arn.starts_with(
                "arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}:parameter${"
            ) && !arn.contains('*'),
            "{arn}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Schedule, sizing, CORS, logs, outputs

#[test]
fn batch_alone_is_scheduled_with_a_valid_expression() {
    let template = template();
    for binary in FUNCTIONS {
        let id = function_for(&template, binary);
        let events = template.function_property(&id, "Events");
        let schedules: Vec<Value> = events
            .iter()
            .filter_map(Value::as_mapping)
            .flat_map(|m| m.values().cloned())
            .filter(|e| matches!(text(e.get("Type")).as_str(), "Schedule" | "ScheduleV2"))
            .collect();
        if binary != "batch" {
            assert!(schedules.is_empty(), "{id} has a schedule");
            continue;
        }
        let [schedule] = schedules.as_slice() else {
            panic!("{id}: expected one schedule, found {}", schedules.len());
        };
        // An EventBridge rule: its events carry `source: aws.events`, which is how the batch
        // binary tells a scheduled drain from a function-URL request.
        assert_eq!(text(schedule.get("Type")), "Schedule");
        let properties = &schedule["Properties"];
        let expression = text(properties.get("Schedule"));
        assert_eq!(schedule_expression_problem(&expression), None);
        assert_eq!(
            text(properties.get("State")),
            "ENABLED",
            "{id} schedule state"
        );
    }
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("events/scheduled.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(fixture["source"], "aws.events");
}

#[test]
fn memory_and_timeouts_are_set_per_function_and_fit_the_work() {
    let template = template();
    let mut timeouts = BTreeMap::new();
    for binary in FUNCTIONS {
        let id = function_for(&template, binary);
        let properties = &template.resource(&id).unwrap()["Properties"];
        let memory = number(properties.get("MemorySize")).unwrap_or_else(|| {
            panic!("{id}: MemorySize must be set on the function, with its reason")
        });
        let timeout = number(properties.get("Timeout")).unwrap_or_else(|| {
            panic!("{id}: Timeout must be set on the function, with its reason")
        });
        assert!((128..=10_240).contains(&memory), "{id} MemorySize {memory}");
        assert!((1..=900).contains(&timeout), "{id} Timeout {timeout}");
        timeouts.insert(binary, timeout);
    }
    // An upstream call may take 3 attempts of LLM_TIMEOUT_MS (10 s) plus backoff.
    for binary in FUNCTIONS {
        assert!(timeouts[binary] >= 60, "{binary}: {}s", timeouts[binary]);
    }
    // Streams and batches are long by nature.
    assert!(
        timeouts["stream"] >= 300,
        "stream timeout {}",
        timeouts["stream"]
    );
    assert_eq!(timeouts["batch"], 900, "batch drains until its deadline");
}

#[test]
fn cors_comes_from_allowed_origins_and_is_off_by_default() {
    let template = template();
    assert_eq!(
        template
            .parameter_default("AllowedOrigins")
            .and_then(Value::as_str),
        Some("")
    );
    assert_eq!(
        text(template.root()["Parameters"]["AllowedOrigins"].get("Type")),
        "CommaDelimitedList"
    );
    for binary in FUNCTIONS {
        let id = function_for(&template, binary);
        let url = template
            .function_property(&id, "FunctionUrlConfig")
            .unwrap();
        let cors = url.get("Cors").unwrap_or_else(|| panic!("{id}: no Cors"));
        let branches = intrinsic(cors, "If")
            .and_then(Value::as_sequence)
            .unwrap_or_else(|| panic!("{id}: Cors must depend on AllowedOrigins (!If)"));
        assert_eq!(text(branches.first()), "HasAllowedOrigins");
        assert_eq!(
            ref_target(&branches[1]["AllowOrigins"]),
            Some("AllowedOrigins")
        );
        assert_eq!(
            ref_target(&branches[2]),
            Some("AWS::NoValue"),
            "{id}: no CORS without origins"
        );
        let rendered = serde_yaml::to_string(cors).unwrap();
        assert!(
            !rendered.contains("'*'") && !rendered.contains("\"*\""),
            "{id}: wildcard in Cors"
        );
    }
    let condition =
        serde_yaml::to_string(&template.root()["Conditions"]["HasAllowedOrigins"]).unwrap();
    assert!(condition.contains("AllowedOrigins"), "{condition}");
}

#[test]
fn every_function_logs_to_its_own_group_with_retention() {
    let template = template();
    let mut groups = BTreeSet::new();
    for binary in FUNCTIONS {
        let id = function_for(&template, binary);
        let logging = &template.resource(&id).unwrap()["Properties"]["LoggingConfig"];
        let group = ref_target(&logging["LogGroup"])
            .unwrap_or_else(|| panic!("{id}: LoggingConfig.LogGroup must reference a log group"));
        let resource = template.resource(group).unwrap();
        assert_eq!(text(resource.get("Type")), "AWS::Logs::LogGroup");
        assert_eq!(
            ref_target(&resource["Properties"]["RetentionInDays"]),
            Some("LogRetentionDays")
        );
        assert!(
            groups.insert(group.to_owned()),
            "{group} shared by two functions"
        );
    }
    let globals = template.globals_function().unwrap();
    assert_eq!(text(globals["LoggingConfig"].get("LogFormat")), "JSON");
}

#[test]
fn outputs_name_every_function_url_and_table() {
    let template = template();
    let outputs = template.root()["Outputs"].as_mapping().unwrap();
    let values: Vec<&Value> = outputs.values().map(|o| &o["Value"]).collect();
    for binary in FUNCTIONS {
        let id = function_for(&template, binary);
        let url = format!("{id}Url");
        assert!(
            values
                .iter()
                .any(|v| get_att(v) == Some((url.clone(), "FunctionUrl".to_owned()))),
            "no output with !GetAtt {url}.FunctionUrl"
        );
    }
    for (table, _) in template.resources_of_type(TABLE_TYPE) {
        assert!(
            values.iter().any(|v| ref_target(v) == Some(table.as_str())),
            "no output with !Ref {table}"
        );
    }
    assert!(template.resources_of_type(FUNCTION_TYPE).len() == FUNCTIONS.len());
}
