//! `admin`: the operator's CLI for the gateway.
//!
//! ```text
//! admin keys create --user alice --tier pro     # stdout: the new key, and nothing else
//! admin keys show   --key <key> | --hash <hex>  # user, tier, revoked (never the key)
//! admin keys revoke --key <key> | --hash <hex>
//! admin jwt mint --user alice --tier free --ttl 1h [--issuer ..] [--audience ..]
//! ```
//!
//! The table comes from `API_KEYS_TABLE` (or `--table`) and DynamoDB is reached through the
//! standard AWS chain, so `AWS_ENDPOINT_URL_DYNAMODB` points the CLI at the local emulator.
//! `--key -` reads the key from stdin, which keeps it out of shell history and `ps`.
//!
//! Output goes through `writeln!` rather than `println!`: a closed pipe is then an error that
//! exits 1, never a panic. Every failure prints one line to stderr and exits with status 1.

mod keys;
mod mint;

use std::io::{self, BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use shared::ApiError;
use shared::auth::Tier;

#[derive(Debug, Parser)]
#[command(
    name = "admin",
    version,
    about = "Manage the gateway's API keys and mint test JWTs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// API keys, stored in DynamoDB as SHA-256 hashes.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// JSON Web Tokens.
    #[command(subcommand)]
    Jwt(JwtCommand),
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key. Prints only the key on stdout; it cannot be shown again.
    Create {
        /// User id the key authenticates as.
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "free", value_parser = parse_tier)]
        tier: Tier,
        #[command(flatten)]
        table: TableArg,
    },
    /// Show the user, tier and state of a key.
    Show {
        #[command(flatten)]
        target: KeyTarget,
        #[command(flatten)]
        table: TableArg,
    },
    /// Revoke a key (it keeps existing, marked revoked; revoking twice is harmless).
    Revoke {
        #[command(flatten)]
        target: KeyTarget,
        #[command(flatten)]
        table: TableArg,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct KeyTarget {
    /// The key itself (`-` reads it from stdin).
    #[arg(long)]
    key: Option<String>,
    /// The key's SHA-256 hash in hex, as printed by `keys create` and `keys show`.
    #[arg(long)]
    hash: Option<String>,
}

#[derive(Debug, Args)]
struct TableArg {
    /// DynamoDB table of API keys.
    #[arg(long = "table", env = "API_KEYS_TABLE")]
    name: Option<String>,
}

#[derive(Debug, Subcommand)]
enum JwtCommand {
    /// Mint a token the functions accept: HS256 with JWT_SECRET from the environment, or RS256
    /// (JWT_ALGORITHM=RS256) with --private-key.
    Mint {
        /// The `sub` claim.
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "free", value_parser = parse_tier)]
        tier: Tier,
        /// Lifetime, e.g. `90s`, `15m`, `1h`, `7d`.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
        #[arg(long, env = "JWT_ISSUER")]
        issuer: Option<String>,
        #[arg(long, env = "JWT_AUDIENCE")]
        audience: Option<String>,
        /// HS256 or RS256.
        #[arg(long, env = "JWT_ALGORITHM", default_value = "HS256")]
        algorithm: String,
        /// PEM private key for RS256.
        #[arg(long)]
        private_key: Option<PathBuf>,
    },
}

/// Everything that can go wrong, each worded for the operator who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{name} is not set: {hint}")]
    MissingSetting {
        name: &'static str,
        hint: &'static str,
    },
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("no API key with hash {hash} in table {table}")]
    KeyNotFound { hash: String, table: String },
    #[error("DynamoDB request failed: {0}")]
    Store(String),
    #[error("cannot read {path}: {source}")]
    ReadFile { path: PathBuf, source: io::Error },
    #[error("cannot sign the token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
    #[error("cannot write output: {0}")]
    Output(#[from] io::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(io::Error),
}

impl From<ApiError> for AdminError {
    /// The API surface hides dependency details from clients; an operator needs them.
    fn from(err: ApiError) -> Self {
        match err {
            ApiError::Unavailable { detail, .. } | ApiError::Internal { detail } => {
                AdminError::Store(detail)
            }
            other => AdminError::Store(other.to_string()),
        }
    }
}

fn parse_tier(value: &str) -> Result<Tier, String> {
    Tier::parse(&value.to_ascii_lowercase())
        .ok_or_else(|| format!("'{value}' is not a tier (free, pro or enterprise)"))
}

/// `<n>` seconds, or `<n>` followed by `s`, `m`, `h` or `d`; at most 366 days.
fn parse_ttl(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{value}' is not a duration like 90s, 15m, 1h or 7d"))?;
    let unit_secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "unknown unit '{unit}' in '{value}' (use s, m, h or d)"
            ));
        }
    };
    match n.checked_mul(unit_secs) {
        Some(0) => Err("the TTL must be positive".to_owned()),
        Some(secs) if secs <= 366 * 86_400 => Ok(Duration::from_secs(secs)),
        _ => Err(format!("'{value}' is longer than 366 days")),
    }
}

impl TableArg {
    fn resolve(self) -> Result<String, AdminError> {
        self.name
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .ok_or(AdminError::MissingSetting {
                name: "API_KEYS_TABLE",
                hint: "set it (or pass --table) to the API keys table name",
            })
    }
}

/// Which key a command is about, reduced to its hash before anything else happens.
fn resolve_target(target: KeyTarget) -> Result<String, AdminError> {
    match (target.key, target.hash) {
        (Some(key), _) => {
            let key = if key == "-" {
                let mut line = String::new();
                io::stdin().lock().read_line(&mut line)?;
                line
            } else {
                key
            };
            let key = key.trim();
            if key.is_empty() {
                return Err(AdminError::Invalid {
                    what: "--key",
                    reason: "the key is empty".to_owned(),
                });
            }
            Ok(shared::auth::hash_api_key(key))
        }
        (None, Some(hash)) => {
            let hash = hash.trim().to_ascii_lowercase();
            if shared::auth::is_key_hash(&hash) {
                Ok(hash)
            } else {
                Err(AdminError::Invalid {
                    what: "--hash",
                    reason: "expected the 64 hex digits of a SHA-256 hash".to_owned(),
                })
            }
        }
        // clap's argument group makes exactly one of them required.
        (None, None) => Err(AdminError::Invalid {
            what: "arguments",
            reason: "pass --key or --hash".to_owned(),
        }),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, AdminError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AdminError::Runtime)
}

fn run(cli: Cli) -> Result<(), AdminError> {
    let mut out = io::stdout().lock();
    // Reading stdin, files and the environment happens here, before the async part starts.
    match cli.command {
        Command::Keys(KeysCommand::Create { user, tier, table }) => {
            let user = keys::validate_user(&user)?;
            let table = table.resolve()?;
            runtime()?.block_on(keys::create(&mut out, &table, user, tier))
        }
        Command::Keys(KeysCommand::Show { target, table }) => {
            let hash = resolve_target(target)?;
            let table = table.resolve()?;
            runtime()?.block_on(keys::show(&mut out, &table, &hash))
        }
        Command::Keys(KeysCommand::Revoke { target, table }) => {
            let hash = resolve_target(target)?;
            let table = table.resolve()?;
            runtime()?.block_on(keys::revoke(&mut out, &table, &hash))
        }
        Command::Jwt(JwtCommand::Mint {
            user,
            tier,
            ttl,
            issuer,
            audience,
            algorithm,
            private_key,
        }) => {
            let user = keys::validate_user(&user)?;
            let signer = mint::Signer::from_env(&algorithm, private_key.as_deref())?;
            let token = signer.mint(&mint::TokenRequest {
                user: &user,
                tier,
                ttl,
                issuer: issuer.as_deref().filter(|s| !s.trim().is_empty()),
                audience: audience.as_deref().filter(|s| !s.trim().is_empty()),
            })?;
            writeln!(out, "{token}")?;
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // --help and --version are successes; every usage error exits 1 like other failures.
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(io::stderr(), "admin: error: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn ttl_accepts_units_and_rejects_nonsense() {
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3_600)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(604_800)));
        for bad in [
            "",
            "h",
            "1w",
            "-1h",
            "0s",
            "1.5h",
            "367d",
            "99999999999999999999d",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn hash_target_is_normalised_and_checked() {
        let hash = shared::auth::hash_api_key("k");
        let target = KeyTarget {
            key: None,
            hash: Some(hash.to_uppercase()),
        };
        assert_eq!(resolve_target(target).unwrap(), hash);
        let target = KeyTarget {
            key: None,
            hash: Some("abc".into()),
        };
        assert!(matches!(
            resolve_target(target),
            Err(AdminError::Invalid { what: "--hash", .. })
        ));
        let target = KeyTarget {
            key: Some("gwk_x".into()),
            hash: None,
        };
        assert_eq!(
            resolve_target(target).unwrap(),
            shared::auth::hash_api_key("gwk_x")
        );
    }

    #[test]
    fn store_errors_keep_their_detail_for_the_operator() {
        let err = AdminError::from(ApiError::Unavailable {
            dependency: "DynamoDB",
            detail: "ResourceNotFoundException: no table t".into(),
        });
        assert!(
            err.to_string().contains("ResourceNotFoundException"),
            "{err}"
        );
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
