//! template.yaml read with serde_yaml.
//!
//! CloudFormation's short-form intrinsics (`!Ref X`, `!GetAtt A.B`, `!Sub ...`) are YAML tags;
//! serde_yaml keeps them as [`Value::Tagged`], so the document loads as it is written. The
//! helpers here understand the intrinsics in both their short (`!Ref X`) and long (`{Ref: X}`,
//! `{"Fn::GetAtt": ...}`) forms, and SAM's `Globals.Function` fallback, which is what the table
//! checks (tests/tests/tables.rs) and the template checks (tests/tests/template.rs) need.

use std::path::Path;

use serde_yaml::{Mapping, Value};

use crate::{HarnessError, Result};

/// The resource type of a DynamoDB table.
pub const TABLE_TYPE: &str = "AWS::DynamoDB::Table";

/// The resource type of a SAM function.
pub const FUNCTION_TYPE: &str = "AWS::Serverless::Function";

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

    /// The whole document.
    pub fn root(&self) -> &Value {
        &self.root
    }

    /// A resource (Type, Properties, Metadata, ...) by logical id.
    pub fn resource(&self, logical_id: &str) -> Option<&Value> {
        self.root.get("Resources")?.get(logical_id)
    }

    /// `(logical id, Properties)` of every SAM function, in template order.
    pub fn functions(&self) -> Vec<(String, Value)> {
        self.resources_of_type(FUNCTION_TYPE)
    }

    /// `Globals.Function`, if any.
    pub fn globals_function(&self) -> Option<&Value> {
        self.root.get("Globals")?.get("Function")
    }

    /// A function's property as SAM sees it: the function's own value, else the one in
    /// `Globals.Function`. (Maps that SAM merges, like `Environment`, have their own helper.)
    pub fn function_property(&self, logical_id: &str, name: &str) -> Option<Value> {
        let own = self
            .resource(logical_id)
            .and_then(|r| r.get("Properties"))
            .and_then(|p| p.get(name));
        own.or_else(|| self.globals_function()?.get(name)).cloned()
    }

    /// A function's environment variables: `Globals.Function` merged with its own, which win.
    pub fn function_env(&self, logical_id: &str) -> Vec<(String, Value)> {
        let mut env = self.global_function_env();
        let own = self
            .resource(logical_id)
            .and_then(|r| r.get("Properties"))
            .and_then(|p| p.get("Environment"))
            .and_then(|e| e.get("Variables"))
            .and_then(Value::as_mapping);
        for (name, value) in own.into_iter().flatten() {
            let Some(name) = name.as_str() else { continue };
            env.retain(|(existing, _)| existing != name);
            env.push((name.to_owned(), value.clone()));
        }
        env
    }

    /// The `Default` of a template parameter.
    pub fn parameter_default(&self, name: &str) -> Option<&Value> {
        self.root.get("Parameters")?.get(name)?.get("Default")
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

/// The argument of intrinsic `name` (`Ref`, `GetAtt`, `Sub`, `If`, ...) in either form: the
/// short tag `!Name x` or the long `{Name: x}` / `{"Fn::Name": x}`.
pub fn intrinsic<'a>(value: &'a Value, name: &str) -> Option<&'a Value> {
    match value {
        Value::Tagged(tagged) if tagged.tag == name => Some(&tagged.value),
        Value::Mapping(map) if map.len() == 1 => map
            .get(name)
            .or_else(|| map.get(format!("Fn::{name}").as_str())),
        _ => None,
    }
}

/// The `(logical id, attribute)` of `!GetAtt X.Attr` / `{"Fn::GetAtt": [X, Attr]}`.
pub fn get_att(value: &Value) -> Option<(String, String)> {
    match intrinsic(value, "GetAtt")? {
        Value::String(dotted) => {
            let (id, attribute) = dotted.split_once('.')?;
            Some((id.to_owned(), attribute.to_owned()))
        }
        Value::Sequence(parts) if parts.len() == 2 => {
            Some((parts[0].as_str()?.to_owned(), parts[1].as_str()?.to_owned()))
        }
        _ => None,
    }
}

/// What an IAM `Resource` entry points at, when it is a table's ARN (`!GetAtt T.Arn`) or one of
/// its indexes (`!Sub "${T.Arn}/index/I"`): `(table logical id, index name)`.
pub fn table_arn_target(value: &Value) -> Option<(String, Option<String>)> {
    if let Some((id, attribute)) = get_att(value) {
        return (attribute == "Arn").then_some((id, None));
    }
    let text = intrinsic(value, "Sub")?.as_str()?;
    let rest = text.strip_prefix("${")?;
    let (reference, tail) = rest.split_once('}')?;
    let id = reference.strip_suffix(".Arn")?;
    let index = tail.strip_prefix("/index/")?;
    (!index.is_empty() && !index.contains(['/', '$', '*']))
        .then(|| (id.to_owned(), Some(index.to_owned())))
}

/// Why `expression` is not a valid EventBridge schedule expression (`rate(...)` or a
/// six-field `cron(...)`), or `None` when it is.
pub fn schedule_expression_problem(expression: &str) -> Option<String> {
    if let Some(body) = expression
        .strip_prefix("rate(")
        .and_then(|r| r.strip_suffix(')'))
    {
        let parts: Vec<&str> = body.split(' ').collect();
        let [value, unit] = parts.as_slice() else {
            return Some(format!("{expression}: rate needs `<value> <unit>`"));
        };
        let Ok(value) = value.parse::<u32>() else {
            return Some(format!("{expression}: `{value}` is not a positive integer"));
        };
        let singular = ["minute", "hour", "day"];
        let plural = ["minutes", "hours", "days"];
        return match value {
            0 => Some(format!("{expression}: the rate must be positive")),
            1 if singular.contains(unit) => None,
            1 => Some(format!("{expression}: a rate of 1 takes a singular unit")),
            _ if plural.contains(unit) => None,
            _ => Some(format!(
                "{expression}: a rate above 1 takes minutes, hours or days"
            )),
        };
    }
    if let Some(body) = expression
        .strip_prefix("cron(")
        .and_then(|r| r.strip_suffix(')'))
    {
        let fields: Vec<&str> = body.split(' ').collect();
        let [minutes, hours, day_of_month, month, day_of_week, year] = fields.as_slice() else {
            return Some(format!(
                "{expression}: cron needs six fields (minutes hours day-of-month month day-of-week year)"
            ));
        };
        if (*day_of_month == "?") == (*day_of_week == "?") {
            return Some(format!(
                "{expression}: exactly one of day-of-month and day-of-week must be `?`"
            ));
        }
        let months = [
            "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
        ];
        let days = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
        let checks: [(&str, &str, u32, u32, &[&str]); 6] = [
            ("minutes", minutes, 0, 59, &[]),
            ("hours", hours, 0, 23, &[]),
            ("day-of-month", day_of_month, 1, 31, &[]),
            ("month", month, 1, 12, &months),
            ("day-of-week", day_of_week, 1, 7, &days),
            ("year", year, 1970, 2199, &[]),
        ];
        for (name, field, low, high, names) in checks {
            if !cron_field_ok(field, low, high, names) {
                return Some(format!("{expression}: invalid {name} field `{field}`"));
            }
        }
        return None;
    }
    Some(format!(
        "{expression}: not `rate(<value> <unit>)` or `cron(<six fields>)`"
    ))
}

/// One cron field: `*`, `?`, or a comma list of values, `a-b` ranges and `x/step` increments,
/// each value a number in `low..=high` or one of `names`. (EventBridge's `L`, `W` and `#` forms
/// are not used here and are rejected.)
fn cron_field_ok(field: &str, low: u32, high: u32, names: &[&str]) -> bool {
    if field == "*" || field == "?" {
        return true;
    }
    let value_ok = |v: &str| {
        v.parse::<u32>().is_ok_and(|n| (low..=high).contains(&n))
            || names.contains(&v.to_ascii_uppercase().as_str())
    };
    field.split(',').all(|part| {
        let (base, step) = match part.split_once('/') {
            Some((base, step)) => (base, Some(step)),
            None => (part, None),
        };
        let step_ok = step.is_none_or(|s| s.parse::<u32>().is_ok_and(|n| n > 0));
        let base_ok = base == "*"
            || match base.split_once('-') {
                Some((a, b)) => value_ok(a) && value_ok(b),
                None => value_ok(base),
            };
        !part.is_empty() && step_ok && base_ok
    })
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
    fn function_env_merges_globals_with_the_functions_own() {
        let template = Template::parse(
            "Globals:\n  Function:\n    Environment:\n      Variables:\n        A: g\n        B: g\n\
             Resources:\n  F:\n    Type: AWS::Serverless::Function\n    Properties:\n      \
             Environment:\n        Variables:\n          B: own\n          C: own\n",
        )
        .unwrap();
        let env: Vec<(String, String)> = template
            .function_env("F")
            .into_iter()
            .map(|(k, v)| (k, v.as_str().unwrap().to_owned()))
            .collect();
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(pairs, [("A", "g"), ("B", "own"), ("C", "own")]);
    }

    #[test]
    fn table_arns_and_index_arns_are_recognised() {
        let template = Template::parse(
            "R:\n  - !GetAtt T.Arn\n  - {\"Fn::GetAtt\": [T, Arn]}\n  - !Sub \"${T.Arn}/index/byOwner\"\n\
             \x20 - !GetAtt T.StreamArn\n  - !Sub \"${T.Arn}/index/*\"\n  - \"*\"\n",
        )
        .unwrap();
        let targets: Vec<Option<(String, Option<String>)>> = template.root()["R"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(table_arn_target)
            .collect();
        let t = || "T".to_owned();
        assert_eq!(
            targets,
            [
                Some((t(), None)),
                Some((t(), None)),
                Some((t(), Some("byOwner".to_owned()))),
                None,
                None,
                None
            ]
        );
    }

    #[test]
    fn schedule_expressions_follow_eventbridge_rules() {
        for valid in [
            "rate(1 minute)",
            "rate(5 minutes)",
            "rate(2 hours)",
            "cron(0 12 * * ? *)",
            "cron(0/15 8-17 ? * MON-FRI *)",
            "cron(30 2 1 JAN,JUL ? 2030)",
        ] {
            assert_eq!(schedule_expression_problem(valid), None, "{valid}");
        }
        for invalid in [
            "rate(1 minutes)",
            "rate(5 minute)",
            "rate(0 minutes)",
            "rate(-1 minutes)",
            "rate(1 second)",
            "rate(1minute)",
            "cron(0 12 * * * *)",
            "cron(0 12 ? * ? *)",
            "cron(0 12 * * ?)",
            "cron(60 12 * * ? *)",
            "cron(0 24 * * ? *)",
            "cron(0 12 * 13 ? *)",
            "every minute",
            "",
        ] {
            assert!(
                schedule_expression_problem(invalid).is_some(),
                "{invalid} was accepted"
            );
        }
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
