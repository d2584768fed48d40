//! The emulator's tables are the ones template.yaml declares, and the functions are told their
//! names: checked with the real AWS SDK (`DescribeTable`, `DescribeTimeToLive`) against the
//! DynamoDB emulator of the local stack.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_dynamodb::types::{BillingMode, KeySchemaElement, TableDescription, TimeToLiveStatus};
use integration_tests::Stack;
use integration_tests::template::{TABLE_TYPE, Template, local_table_name, ref_target};
use serde_yaml::Value;

/// Every table keeps its own expiry in this attribute (ARCHITECTURE.md, "Data in DynamoDB").
const TTL_ATTRIBUTE: &str = "expires_at";
const ON_DEMAND: &str = "PAY_PER_REQUEST";

/// A table's definition reduced to what must match between the template and the emulator.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TableShape {
    /// `(attribute, HASH|RANGE)` in schema order.
    keys: Vec<(String, String)>,
    /// `(attribute, S|N|B)`.
    attributes: BTreeSet<(String, String)>,
    global_indexes: BTreeMap<String, IndexShape>,
    local_indexes: BTreeMap<String, IndexShape>,
    billing: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct IndexShape {
    keys: Vec<(String, String)>,
    projection: String,
    non_key_attributes: BTreeSet<String>,
}

fn text(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(s)) => s.clone(),
        Some(other) => format!("<not a literal: {other:?}>"),
        None => "<missing>".to_owned(),
    }
}

fn yaml_list(value: Option<&Value>) -> &[Value] {
    value
        .and_then(Value::as_sequence)
        .map_or(&[], Vec::as_slice)
}

fn yaml_keys(value: Option<&Value>) -> Vec<(String, String)> {
    yaml_list(value)
        .iter()
        .map(|k| (text(k.get("AttributeName")), text(k.get("KeyType"))))
        .collect()
}

fn yaml_indexes(value: Option<&Value>) -> BTreeMap<String, IndexShape> {
    yaml_list(value)
        .iter()
        .map(|index| {
            let projection = index.get("Projection");
            (
                text(index.get("IndexName")),
                IndexShape {
                    keys: yaml_keys(index.get("KeySchema")),
                    projection: text(projection.and_then(|p| p.get("ProjectionType"))),
                    non_key_attributes: yaml_list(
                        projection.and_then(|p| p.get("NonKeyAttributes")),
                    )
                    .iter()
                    .map(|a| text(Some(a)))
                    .collect(),
                },
            )
        })
        .collect()
}

fn template_shape(properties: &Value) -> TableShape {
    TableShape {
        keys: yaml_keys(properties.get("KeySchema")),
        attributes: yaml_list(properties.get("AttributeDefinitions"))
            .iter()
            .map(|a| (text(a.get("AttributeName")), text(a.get("AttributeType"))))
            .collect(),
        global_indexes: yaml_indexes(properties.get("GlobalSecondaryIndexes")),
        local_indexes: yaml_indexes(properties.get("LocalSecondaryIndexes")),
        // CloudFormation's default when BillingMode is absent.
        billing: properties
            .get("BillingMode")
            .map_or_else(|| "PROVISIONED".to_owned(), |v| text(Some(v))),
    }
}

fn sdk_keys(keys: &[KeySchemaElement]) -> Vec<(String, String)> {
    keys.iter()
        .map(|k| {
            (
                k.attribute_name().to_owned(),
                k.key_type().as_str().to_owned(),
            )
        })
        .collect()
}

fn sdk_index(
    name: Option<&str>,
    keys: &[KeySchemaElement],
    projection: Option<&aws_sdk_dynamodb::types::Projection>,
) -> (String, IndexShape) {
    (
        name.unwrap_or("<unnamed>").to_owned(),
        IndexShape {
            keys: sdk_keys(keys),
            projection: projection
                .and_then(|p| p.projection_type())
                .map_or_else(|| "<missing>".to_owned(), |t| t.as_str().to_owned()),
            non_key_attributes: projection
                .map(|p| p.non_key_attributes().iter().cloned().collect())
                .unwrap_or_default(),
        },
    )
}

fn emulator_shape(table: &TableDescription) -> TableShape {
    TableShape {
        keys: sdk_keys(table.key_schema()),
        attributes: table
            .attribute_definitions()
            .iter()
            .map(|a| {
                (
                    a.attribute_name().to_owned(),
                    a.attribute_type().as_str().to_owned(),
                )
            })
            .collect(),
        global_indexes: table
            .global_secondary_indexes()
            .iter()
            .map(|i| sdk_index(i.index_name(), i.key_schema(), i.projection()))
            .collect(),
        local_indexes: table
            .local_secondary_indexes()
            .iter()
            .map(|i| sdk_index(i.index_name(), i.key_schema(), i.projection()))
            .collect(),
        // DynamoDB leaves the summary out for tables that were always provisioned.
        billing: table
            .billing_mode_summary()
            .and_then(|s| s.billing_mode())
            .map_or_else(|| "PROVISIONED".to_owned(), |b| b.as_str().to_owned()),
    }
}

fn template_tables(stack: &Stack) -> Vec<(String, Value)> {
    let template = Template::load(stack.template_path())
        .unwrap_or_else(|e| panic!("{}: {e}", stack.template_path().display()));
    let tables = template.resources_of_type(TABLE_TYPE);
    assert!(
        !tables.is_empty(),
        "{} declares no {TABLE_TYPE}",
        stack.template_path().display()
    );
    tables
}

#[tokio::test]
async fn emulator_tables_have_the_template_keys_attributes_and_indexes() {
    let stack = Stack::require();
    let client = stack.dynamodb().await.unwrap();
    let mut mismatches = Vec::new();
    for (logical_id, properties) in template_tables(&stack) {
        let name = local_table_name(stack.table_prefix(), &logical_id);
        let described = client
            .describe_table()
            .table_name(&name)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "DescribeTable {name} (template table {logical_id}): {}",
                    aws_sdk_dynamodb::error::DisplayErrorContext(&e)
                )
            });
        let table = described
            .table()
            .unwrap_or_else(|| panic!("DescribeTable {name} returned no table"));
        let want = template_shape(&properties);
        let have = emulator_shape(table);
        if want != have {
            mismatches.push(format!(
                "{name} ({logical_id}):\n  template {want:?}\n  emulator {have:?}"
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "tables differ from template.yaml:\n{}",
        mismatches.join("\n")
    );
}

#[tokio::test]
async fn every_table_is_on_demand_with_ttl_on_expires_at() {
    let stack = Stack::require();
    let client = stack.dynamodb().await.unwrap();
    for (logical_id, properties) in template_tables(&stack) {
        // The template itself must say so ...
        assert_eq!(
            text(properties.get("BillingMode")),
            ON_DEMAND,
            "template {logical_id}: BillingMode"
        );
        let ttl = properties.get("TimeToLiveSpecification");
        assert_eq!(
            text(ttl.and_then(|t| t.get("AttributeName"))),
            TTL_ATTRIBUTE,
            "template {logical_id}: TimeToLiveSpecification.AttributeName"
        );
        assert_eq!(
            ttl.and_then(|t| t.get("Enabled")).and_then(Value::as_bool),
            Some(true),
            "template {logical_id}: TimeToLiveSpecification.Enabled"
        );

        // ... and the emulator's copy must be the same.
        let name = local_table_name(stack.table_prefix(), &logical_id);
        let described = client
            .describe_table()
            .table_name(&name)
            .send()
            .await
            .unwrap_or_else(|e| panic!("DescribeTable {name}: {e}"));
        let billing = described
            .table()
            .and_then(|t| t.billing_mode_summary())
            .and_then(|s| s.billing_mode());
        assert_eq!(
            billing,
            Some(&BillingMode::PayPerRequest),
            "{name}: billing mode"
        );
        let ttl = client
            .describe_time_to_live()
            .table_name(&name)
            .send()
            .await
            .unwrap_or_else(|e| panic!("DescribeTimeToLive {name}: {e}"));
        let ttl = ttl
            .time_to_live_description()
            .unwrap_or_else(|| panic!("{name}: no TimeToLiveDescription"));
        assert!(
            matches!(
                ttl.time_to_live_status(),
                Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
            ),
            "{name}: TTL status {:?}",
            ttl.time_to_live_status()
        );
        assert_eq!(
            ttl.attribute_name(),
            Some(TTL_ATTRIBUTE),
            "{name}: TTL attribute"
        );
    }
}

#[tokio::test]
async fn table_env_vars_name_the_local_tables() {
    let stack = Stack::require();
    let template = Template::load(stack.template_path()).unwrap();
    let tables: BTreeSet<String> = template
        .resources_of_type(TABLE_TYPE)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let mut referenced = BTreeSet::new();
    for (variable, value) in template.global_function_env() {
        let Some(target) = ref_target(&value).filter(|t| tables.contains(*t)) else {
            continue;
        };
        let expected = local_table_name(stack.table_prefix(), target);
        assert_eq!(
            std::env::var(&variable).ok().as_deref(),
            Some(expected.as_str()),
            "{variable} (template: !Ref {target}) in the test environment"
        );
        referenced.insert(target.to_owned());
    }
    // A table no function is told about is unreachable: table names only come from env.
    let unreferenced: Vec<_> = tables.difference(&referenced).collect();
    assert!(
        unreferenced.is_empty(),
        "tables without a `X_TABLE: !Ref <table>` in Globals.Function.Environment: {unreferenced:?}"
    );
}
