//! CORS (issue 11). Function URLs apply CORS from template.yaml's `FunctionUrlConfig.Cors`; the
//! functions add no CORS headers of their own (checked on the routers in process, in
//! functions/*/tests/hardening.rs, because `cargo lambda watch` answers every origin itself).
//! Here: the template allows only the origins of its `AllowedOrigins` parameter, whose default
//! allows none, and never `*`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use integration_tests::template::{Template, ref_target};
use serde_yaml::Value;

fn template() -> Template {
    Template::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../template.yaml")).unwrap()
}

/// Every mapping inside `value` (through `!If` and lists) that has the key `key`.
fn mappings_with<'a>(value: &'a Value, key: &str, found: &mut Vec<&'a Value>) {
    match value {
        Value::Mapping(map) => {
            if map.contains_key(key) {
                found.push(value);
            }
            for (_, v) in map {
                mappings_with(v, key, found);
            }
        }
        Value::Sequence(items) => items.iter().for_each(|v| mappings_with(v, key, found)),
        Value::Tagged(tagged) => mappings_with(&tagged.value, key, found),
        _ => {}
    }
}

fn strings<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
    match value {
        Value::String(s) => found.push(s),
        Value::Mapping(map) => map.iter().for_each(|(_, v)| strings(v, found)),
        Value::Sequence(items) => items.iter().for_each(|v| strings(v, found)),
        Value::Tagged(tagged) => strings(&tagged.value, found),
        _ => {}
    }
}

#[test]
fn allowed_origins_parameter_defaults_to_no_origin_and_never_a_wildcard() {
    let template = template();
    let parameter = &template.root()["Parameters"]["AllowedOrigins"];
    assert!(
        parameter.is_mapping(),
        "template.yaml declares no AllowedOrigins parameter"
    );
    assert_eq!(parameter["Type"].as_str(), Some("CommaDelimitedList"));
    let default = parameter["Default"].as_str().unwrap_or_default();
    let origins: Vec<&str> = default
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .collect();
    assert!(
        origins.iter().all(|o| !o.contains('*')),
        "the default allows a wildcard origin: {default:?}"
    );
    assert!(
        origins.iter().all(|o| o.starts_with("https://")),
        "a default origin must be an https origin: {default:?}"
    );
}

#[test]
fn every_function_url_takes_its_origins_from_the_parameter_only() {
    let functions = template().resources_of_type("AWS::Serverless::Function");
    assert!(!functions.is_empty());
    for (name, properties) in functions {
        let Some(url) = properties.get("FunctionUrlConfig") else {
            continue;
        };
        let cors = url
            .get("Cors")
            .unwrap_or_else(|| panic!("{name}: FunctionUrlConfig has no Cors"));
        let mut configs = Vec::new();
        mappings_with(cors, "AllowOrigins", &mut configs);
        assert!(!configs.is_empty(), "{name}: Cors sets no AllowOrigins");
        for config in configs {
            assert_eq!(
                ref_target(&config["AllowOrigins"]),
                Some("AllowedOrigins"),
                "{name}: AllowOrigins must be !Ref AllowedOrigins"
            );
            assert_ne!(
                config.get("AllowCredentials").and_then(Value::as_bool),
                Some(true),
                "{name}: credentials travel in headers, never cookies"
            );
        }
        let mut texts = Vec::new();
        strings(cors, &mut texts);
        assert!(
            texts.iter().all(|t| !t.contains('*')),
            "{name}: a wildcard in Cors: {texts:?}"
        );
    }
}
