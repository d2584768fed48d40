//! template.yaml read with serde_yaml.
//!
//! CloudFormation's short-form intrinsics (`!Ref X`, `!GetAtt A.B`, `!Sub ...`) are YAML tags;
//! serde_yaml keeps them as [`Value::Tagged`], so the document loads as it is written. The
//! helpers here understand `!Ref` in both its short and its long (`{Ref: X}`) form, which is all
//! the table checks need.

use std::path::Path;

use serde_yaml::{Mapping, Value};

use crate::{HarnessError, Result};

/// The resource type of a DynamoDB table.
pub const TABLE_TYPE: &str = "AWS::DynamoDB::Table";

/// A parsed SAM/CloudFormation template.
#[derive(Debug, Clone)]
pub struct Template {
    root: Value,
}

impl Template {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self> {
        let root: Value = serde_yaml::from_str(text)?;
        if !root.is_mapping() {
            return Err(HarnessError::Unexpected(
                "the template is not a YAML mapping".to_owned(),
            ));
        }
        Ok(Self { root })
    }

    /// `(logical id, Properties)` of every resource of type `kind`, in template order.
    pub fn resources_of_type(&self, kind: &str) -> Vec<(String, Value)> {
        let Some(resources) = self.root.get("Resources").and_then(Value::as_mapping) else {
            return Vec::new();
        };
        resources
            .iter()
            .filter(|(_, resource)| resource.get("Type").and_then(Value::as_str) == Some(kind))
            .filter_map(|(id, resource)| {
                let properties = resource
                    .get("Properties")
                    .cloned()
                    .unwrap_or(Value::Mapping(Mapping::new()));
                Some((id.as_str()?.to_owned(), properties))
            })
            .collect()
    }

    /// `Globals.Function.Environment.Variables`, in template order.
    pub fn global_function_env(&self) -> Vec<(String, Value)> {
        let variables = self
            .root
            .get("Globals")
            .and_then(|g| g.get("Function"))
            .and_then(|f| f.get("Environment"))
            .and_then(|e| e.get("Variables"))
            .and_then(Value::as_mapping);
        variables
            .into_iter()
            .flatten()
            .filter_map(|(name, value)| Some((name.as_str()?.to_owned(), value.clone())))
            .collect()
    }
}

/// The logical id `value` refers to, for `!Ref X` and `{Ref: X}`.
pub fn ref_target(value: &Value) -> Option<&str> {
    match value {
        Value::Tagged(tagged) if tagged.tag == "Ref" => tagged.value.as_str(),
        Value::Mapping(map) if map.len() == 1 => map.get("Ref").and_then(Value::as_str),
        _ => None,
    }
}

/// The emulator's name for a template table, the rule of infra/tables.py: the logical id without
/// its `Table` suffix, lowercased, after the prefix (`ConversationsTable` -> `local-conversations`).
pub fn local_table_name(prefix: &str, logical_id: &str) -> String {
    let base = match logical_id.strip_suffix("Table") {
        Some(base) if !base.is_empty() => base,
        _ => logical_id,
    };
    format!("{prefix}-{}", base.to_lowercase())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn short_and_long_refs_resolve() {
        let template = Template::parse(
            "Globals:\n  Function:\n    Environment:\n      Variables:\n        \
             A: !Ref ATable\n        B: {Ref: BTable}\n        C: plain\n        D: !GetAtt X.Arn\n",
        )
        .unwrap();
        let env = template.global_function_env();
        let targets: Vec<Option<&str>> = env.iter().map(|(_, v)| ref_target(v)).collect();
        assert_eq!(targets, [Some("ATable"), Some("BTable"), None, None]);
    }

    #[test]
    fn local_names_follow_the_tables_py_rule() {
        assert_eq!(
            local_table_name("local", "ConversationsTable"),
            "local-conversations"
        );
        assert_eq!(local_table_name("p", "RateLimitsTable"), "p-ratelimits");
        assert_eq!(local_table_name("p", "Table"), "p-table");
        assert_eq!(local_table_name("p", "Jobs"), "p-jobs");
    }
}
