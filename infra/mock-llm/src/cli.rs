//! Command line and environment: where to listen.

use std::fmt;

pub const ADDR_ENV: &str = "MOCK_LLM_ADDR";
pub const DEFAULT_ADDR: &str = "127.0.0.1:8081";

pub const USAGE: &str = "usage: mock-llm [--addr HOST:PORT]   (or MOCK_LLM_ADDR; default 127.0.0.1:8081; port 0 picks a free port)";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliError {
    MissingValue,
    Unexpected(String),
    HelpRequested,
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingValue => write!(f, "--addr needs a value\n{USAGE}"),
            Self::Unexpected(arg) => write!(f, "unexpected argument `{arg}`\n{USAGE}"),
            Self::HelpRequested => f.write_str(USAGE),
        }
    }
}

impl std::error::Error for CliError {}

/// The listen address: `--addr` wins over the environment, which wins over the default.
pub fn listen_addr(
    args: impl IntoIterator<Item = String>,
    env_addr: Option<String>,
) -> Result<String, CliError> {
    let mut from_args = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--addr" {
            from_args = Some(args.next().ok_or(CliError::MissingValue)?);
        } else if let Some(value) = arg.strip_prefix("--addr=") {
            from_args = Some(value.to_owned());
        } else if arg == "--help" || arg == "-h" {
            return Err(CliError::HelpRequested);
        } else {
            return Err(CliError::Unexpected(arg));
        }
    }
    Ok(from_args
        .or(env_addr.filter(|addr| !addr.trim().is_empty()))
        .unwrap_or_else(|| DEFAULT_ADDR.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn flag_beats_environment_beats_default() {
        let env = Some("127.0.0.1:9000".to_owned());
        assert_eq!(
            listen_addr(args(&["--addr", "127.0.0.1:0"]), env.clone()),
            Ok("127.0.0.1:0".to_owned())
        );
        assert_eq!(
            listen_addr(args(&["--addr=0.0.0.0:1"]), env.clone()),
            Ok("0.0.0.0:1".to_owned())
        );
        assert_eq!(listen_addr(args(&[]), env), Ok("127.0.0.1:9000".to_owned()));
        assert_eq!(listen_addr(args(&[]), None), Ok(DEFAULT_ADDR.to_owned()));
        assert_eq!(
            listen_addr(args(&[]), Some(" ".to_owned())),
            Ok(DEFAULT_ADDR.to_owned())
        );
    }

    #[test]
    fn rejects_missing_value_and_unknown_arguments() {
        assert_eq!(
            listen_addr(args(&["--addr"]), None),
            Err(CliError::MissingValue)
        );
        assert_eq!(
            listen_addr(args(&["--port", "1"]), None),
            Err(CliError::Unexpected("--port".to_owned()))
        );
    }
}
