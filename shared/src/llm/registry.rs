//! The model registry: which models exist, their aliases, prices, limits and fallbacks.
//!
//! It is data, not code: `shared/models.toml` is compiled in, and `MODEL_REGISTRY_PATH` names a
//! file that replaces it (or, with `extends = "builtin"`, adds to it). Everything wrong with a
//! registry is reported at once and naming the entry, at cold start, so a bad deployment fails
//! before serving its first request.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::Usage;
use crate::config::LlmSettings;

const BUILTIN_TOML: &str = include_str!("../../models.toml");
const BUILTIN_SOURCE: &str = "built-in models.toml";
/// The only accepted value of `extends`.
const EXTENDS_BUILTIN: &str = "builtin";

/// One model the gateway may call.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    /// The id sent upstream.
    pub id: String,
    /// Other names clients may use (dated snapshots, short names).
    #[serde(default)]
    pub aliases: Vec<String>,
    pub owned_by: String,
    /// USD per 1,000 prompt tokens.
    pub input_per_1k_usd: f64,
    /// USD per 1,000 completion tokens.
    pub output_per_1k_usd: f64,
    pub context_window: u32,
    pub max_output_tokens: u32,
    /// Id of the model tried once when this one keeps failing transiently.
    #[serde(default)]
    pub fallback: Option<String>,
}

impl ModelInfo {
    /// The id followed by the aliases.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.id.as_str()).chain(self.aliases.iter().map(String::as_str))
    }
}

/// `usage` priced with `model`'s registry prices, in USD.
pub fn cost_usd(model: &ModelInfo, usage: &Usage) -> f64 {
    // Token counts stay far below 2^53, so the conversions are exact.
    (usage.prompt_tokens as f64 * model.input_per_1k_usd
        + usage.completion_tokens as f64 * model.output_per_1k_usd)
        / 1000.0
}

/// The file format.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    extends: Option<String>,
    #[serde(default)]
    default_model: Option<String>,
    #[serde(default)]
    models: Vec<ModelInfo>,
}

/// Why a registry could not be loaded; `Display` names the file and every offending entry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read model registry {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model registry {source_name} is not valid TOML: {source}")]
    Parse {
        source_name: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid model registry {source_name}: {}", problems.join("; "))]
    Invalid {
        source_name: String,
        problems: Vec<String>,
    },
}

/// The validated registry. Cheap to clone; immutable once loaded.
#[derive(Debug, Clone)]
pub struct ModelRegistry {
    models: Vec<ModelInfo>,
    /// Every id and alias, to its index in `models`.
    names: HashMap<String, usize>,
    default: usize,
}

impl ModelRegistry {
    /// The compiled-in `shared/models.toml`.
    pub fn builtin() -> Result<Self, RegistryError> {
        Self::from_toml(BUILTIN_TOML, BUILTIN_SOURCE)
    }

    /// The registry the configuration asks for: `MODEL_REGISTRY_PATH` or the built-in one, with
    /// `DEFAULT_MODEL` (an id or alias) overriding the file's default.
    pub fn load(settings: &LlmSettings) -> Result<Self, RegistryError> {
        let registry = match &settings.registry_path {
            Some(path) => Self::from_path(path)?,
            None => Self::builtin()?,
        };
        match &settings.default_model {
            Some(model) => registry.with_default(model),
            None => Ok(registry),
        }
    }

    pub fn from_path(path: &Path) -> Result<Self, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates a registry document; `source_name` only labels errors.
    pub fn from_toml(text: &str, source_name: &str) -> Result<Self, RegistryError> {
        let parse = |text: &str, source_name: &str| {
            toml::from_str::<RegistryFile>(text).map_err(|source| RegistryError::Parse {
                source_name: source_name.to_owned(),
                source,
            })
        };
        let file = parse(text, source_name)?;
        let (mut models, mut default_model) = (Vec::new(), None);
        match file.extends.as_deref() {
            None => {}
            Some(EXTENDS_BUILTIN) if source_name != BUILTIN_SOURCE => {
                let base = parse(BUILTIN_TOML, BUILTIN_SOURCE)?;
                models = base.models;
                default_model = base.default_model;
            }
            Some(other) => {
                return Err(RegistryError::Invalid {
                    source_name: source_name.to_owned(),
                    problems: vec![format!(
                        "extends must be \"{EXTENDS_BUILTIN}\" (got \"{other}\")"
                    )],
                });
            }
        }
        models.extend(file.models);
        Self::validated(models, file.default_model.or(default_model)).map_err(|problems| {
            RegistryError::Invalid {
                source_name: source_name.to_owned(),
                problems,
            }
        })
    }

    /// The same registry with another default model (an id or alias).
    pub fn with_default(mut self, model: &str) -> Result<Self, RegistryError> {
        match self.names.get(model) {
            Some(&index) => {
                self.default = index;
                Ok(self)
            }
            None => Err(RegistryError::Invalid {
                source_name: "DEFAULT_MODEL".to_owned(),
                problems: vec![format!("DEFAULT_MODEL '{model}' is not a known model")],
            }),
        }
    }

    /// The model named `name` (an id or an alias).
    pub fn resolve(&self, name: &str) -> Option<&ModelInfo> {
        self.names.get(name).and_then(|&i| self.models.get(i))
    }

    /// Every model, in file order (the built-in ones first for an extending file).
    pub fn models(&self) -> &[ModelInfo] {
        &self.models
    }

    pub fn default_model(&self) -> &ModelInfo {
        // `default` is an index checked at construction, and `models` is never empty.
        &self.models[self.default.min(self.models.len().saturating_sub(1))]
    }

    /// The model tried once when `model` keeps failing.
    pub fn fallback_for(&self, model: &ModelInfo) -> Option<&ModelInfo> {
        model.fallback.as_deref().and_then(|id| self.resolve(id))
    }

    fn validated(
        mut models: Vec<ModelInfo>,
        default_model: Option<String>,
    ) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        if models.is_empty() {
            problems.push("no models defined".to_owned());
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        for (index, model) in models.iter().enumerate() {
            let label = if model.id.trim().is_empty() {
                problems.push(format!("model #{} has an empty id", index + 1));
                format!("#{}", index + 1)
            } else {
                format!("'{}'", model.id)
            };
            for name in model.names() {
                if name.trim().is_empty() {
                    problems.push(format!("model {label} has an empty alias"));
                    continue;
                }
                match names.get(name) {
                    Some(&other) if other == index => {
                        problems.push(format!("model {label} lists the name '{name}' twice"));
                    }
                    Some(&other) => {
                        let owner = models.get(other).map_or("?", |m| m.id.as_str());
                        problems.push(format!(
                            "model {label}: name '{name}' is already used by model '{owner}'"
                        ));
                    }
                    None => {
                        names.insert(name.to_owned(), index);
                    }
                }
            }
            for (field, price) in [
                ("input_per_1k_usd", model.input_per_1k_usd),
                ("output_per_1k_usd", model.output_per_1k_usd),
            ] {
                if !(price.is_finite() && price >= 0.0) {
                    problems.push(format!(
                        "model {label}: {field} must be a non-negative number (got {price})"
                    ));
                }
            }
            if model.context_window == 0 {
                problems.push(format!("model {label}: context_window must be positive"));
            }
            if model.max_output_tokens == 0 || model.max_output_tokens > model.context_window {
                problems.push(format!(
                    "model {label}: max_output_tokens must be within 1..=context_window (got {})",
                    model.max_output_tokens
                ));
            }
        }
        // Fallbacks are checked once every name is known, so they may point forward; an alias
        // is accepted and replaced by the id it names.
        let ids: Vec<String> = models.iter().map(|m| m.id.clone()).collect();
        for (index, model) in models.iter_mut().enumerate() {
            let Some(fallback) = model.fallback.take() else {
                continue;
            };
            match names.get(&fallback) {
                None => problems.push(format!(
                    "model '{}': fallback '{fallback}' is not a known model",
                    model.id
                )),
                Some(&target) if target == index => {
                    problems.push(format!("model '{}': falls back to itself", model.id));
                }
                Some(&target) => model.fallback = ids.get(target).cloned(),
            }
        }
        let default = match default_model {
            None => {
                problems.push("default_model is required".to_owned());
                0
            }
            Some(name) => match names.get(&name) {
                Some(&index) => index,
                None => {
                    problems.push(format!("default_model '{name}' is not a known model"));
                    0
                }
            },
        };
        if problems.is_empty() {
            Ok(Self {
                models,
                names,
                default,
            })
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn model(id: &str) -> String {
        format!(
            "[[models]]\nid = \"{id}\"\nowned_by = \"t\"\ninput_per_1k_usd = 0.001\n\
             output_per_1k_usd = 0.002\ncontext_window = 1000\nmax_output_tokens = 100\n"
        )
    }

    fn problems(text: &str) -> String {
        match ModelRegistry::from_toml(text, "test.toml") {
            Err(err @ RegistryError::Invalid { .. }) => err.to_string(),
            Err(other) => panic!("expected Invalid, got {other}"),
            Ok(_) => panic!("expected the registry to be rejected"),
        }
    }

    #[test]
    fn builtin_registry_loads_with_public_prices_and_fallbacks() {
        let registry = ModelRegistry::builtin().unwrap();
        assert_eq!(registry.default_model().id, "gpt-4o-mini");
        let mini = registry.resolve("gpt-4o-mini").unwrap();
        assert_eq!(mini.input_per_1k_usd, 0.00015);
        assert_eq!(mini.output_per_1k_usd, 0.0006);
        let four_o = registry.resolve("gpt-4o-2024-08-06").unwrap();
        assert_eq!(four_o.id, "gpt-4o");
        assert_eq!(
            (four_o.input_per_1k_usd, four_o.output_per_1k_usd),
            (0.0025, 0.01)
        );
        assert_eq!(registry.fallback_for(four_o).unwrap().id, "gpt-4o-mini");
        assert!(registry.fallback_for(mini).is_none());
        for id in ["gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano"] {
            assert!(registry.resolve(id).is_some(), "{id}");
        }
        assert!(
            registry.resolve("mock-fault-429").is_none(),
            "mock models stay out of production"
        );
    }

    #[test]
    fn test_registry_extends_the_builtin_one_with_mock_models() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models.test.toml");
        let registry = ModelRegistry::from_path(&path).unwrap();
        assert_eq!(registry.default_model().id, "gpt-4o-mini");
        assert!(registry.resolve("gpt-4.1-nano").is_some());
        let hang = registry.resolve("mock-fault-hang").unwrap();
        assert_eq!(registry.fallback_for(hang).unwrap().id, "gpt-4o-mini");
    }

    #[test]
    fn cost_is_priced_per_thousand_tokens() {
        let registry = ModelRegistry::builtin().unwrap();
        let mini = registry.resolve("gpt-4o-mini").unwrap();
        let cost = cost_usd(mini, &Usage::reported(1000, 2000));
        assert!((cost - (0.00015 + 2.0 * 0.0006)).abs() < 1e-15, "{cost}");
        assert_eq!(cost_usd(mini, &Usage::default()), 0.0);
    }

    #[test]
    fn rejects_duplicate_ids_and_aliases_naming_both_entries() {
        let text = format!(
            "default_model = \"a\"\n{}{}{}aliases = [\"a\"]\n",
            model("a"),
            model("a"),
            model("b")
        );
        let err = problems(&text);
        assert!(
            err.contains("model 'a': name 'a' is already used by model 'a'"),
            "{err}"
        );
        assert!(
            err.contains("model 'b': name 'a' is already used by model 'a'"),
            "{err}"
        );
    }

    #[test]
    fn rejects_unknown_and_self_fallbacks() {
        let text = format!(
            "default_model = \"a\"\n{}fallback = \"nope\"\n{}fallback = \"b\"\n",
            model("a"),
            model("b")
        );
        let err = problems(&text);
        assert!(
            err.contains("model 'a': fallback 'nope' is not a known model"),
            "{err}"
        );
        assert!(err.contains("model 'b': falls back to itself"), "{err}");
    }

    #[test]
    fn fallback_may_name_an_alias_and_point_forward() {
        let text = format!(
            "default_model = \"a\"\n{}fallback = \"bee\"\n{}aliases = [\"bee\"]\n",
            model("a"),
            model("b")
        );
        let registry = ModelRegistry::from_toml(&text, "t").unwrap();
        let a = registry.resolve("a").unwrap();
        assert_eq!(a.fallback.as_deref(), Some("b"));
        assert_eq!(registry.fallback_for(a).unwrap().id, "b");
    }

    #[test]
    fn rejects_negative_prices_and_impossible_limits() {
        let text = format!(
            "default_model = \"a\"\n{}",
            model("a")
                .replace("input_per_1k_usd = 0.001", "input_per_1k_usd = -0.001")
                .replace("max_output_tokens = 100", "max_output_tokens = 5000")
        );
        let err = problems(&text);
        assert!(
            err.contains("model 'a': input_per_1k_usd must be a non-negative number (got -0.001)"),
            "{err}"
        );
        assert!(
            err.contains("model 'a': max_output_tokens must be within 1..=context_window"),
            "{err}"
        );
    }

    #[test]
    fn rejects_missing_or_unknown_default_and_empty_registry() {
        assert!(problems(&model("a")).contains("default_model is required"));
        let err = problems(&format!("default_model = \"zz\"\n{}", model("a")));
        assert!(
            err.contains("default_model 'zz' is not a known model"),
            "{err}"
        );
        assert!(problems("default_model = \"a\"\n").contains("no models defined"));
    }

    #[test]
    fn rejects_unknown_fields_and_unknown_extends() {
        let typo = format!("default_model = \"a\"\n{}fallbak = \"a\"\n", model("a"));
        let err = ModelRegistry::from_toml(&typo, "t.toml").unwrap_err();
        assert!(matches!(err, RegistryError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("fallbak"), "{err}");
        assert!(problems("extends = \"elsewhere\"\n").contains("extends must be \"builtin\""));
    }

    #[test]
    fn extending_file_may_not_redefine_a_builtin_model() {
        let err = problems(&format!("extends = \"builtin\"\n{}", model("gpt-4o")));
        assert!(
            err.contains("model 'gpt-4o': name 'gpt-4o' is already used by model 'gpt-4o'"),
            "{err}"
        );
    }

    #[test]
    fn load_applies_path_and_default_override() {
        let settings = |path: Option<&str>, default: Option<&str>| LlmSettings {
            base_url: "http://x".into(),
            api_key: None,
            timeout: std::time::Duration::from_secs(1),
            registry_path: path.map(PathBuf::from),
            default_model: default.map(str::to_owned),
        };
        let registry = ModelRegistry::load(&settings(None, Some("gpt-4o-2024-08-06"))).unwrap();
        assert_eq!(registry.default_model().id, "gpt-4o");
        let err = ModelRegistry::load(&settings(None, Some("gpt-9"))).unwrap_err();
        assert!(err.to_string().contains("DEFAULT_MODEL 'gpt-9'"), "{err}");
        let err = ModelRegistry::load(&settings(Some("/nonexistent/models.toml"), None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/models.toml"), "{err}");
    }
}
