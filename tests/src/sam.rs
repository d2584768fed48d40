//! The functions as SAM runs them: `sam local invoke` and `sam local start-lambda`, in the Docker
//! engine of `infra/sam-local.sh`, on the host network (through `infra/sam_host_network.py`), so
//! the built `bootstrap`s reach the local stack's DynamoDB emulator and mock LLM on 127.0.0.1.
//!
//! `make sam-test` (infra/sam-local.sh test) provides everything: the engine (`DOCKER_HOST`),
//! the base image, `sam build` (.aws-sam/build), and the stack without cargo lambda watch
//! (`devstack.py run --services-only`). Without them a test fails with [`NEEDS_SAM`].
//!
//! Each [`SamLocal`] is one test's deployment: it stores a fresh OpenAI key and a fresh JWT
//! secret as SSM SecureString parameters in the emulator and passes only their *names*, as
//! template parameters, exactly as a deployment does, so every invocation also proves that the
//! secrets are read from SSM at cold start. Only the emulator endpoints are added to the
//! functions' environment (they have no place in the template); everything else the functions
//! see comes from template.yaml, its parameters, and the local table names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

use crate::{HarnessError, Result, stack_var, unique};

/// What a test reports when it runs outside `make sam-test`.
pub const NEEDS_SAM: &str = "this test needs the SAM local setup: run `make sam-test` \
     (infra/sam-local.sh test: Docker engine, base image, sam build, local stack)";

/// A cold `sam local invoke` (template parse, container start, cold start of the bootstrap)
/// takes a few seconds; a loaded 2-core machine running other invocations needs more.
const INVOKE_TIMEOUT: Duration = Duration::from_secs(180);

/// Variables of the test's own environment that SAM may see. Everything else is left out, so
/// the stack's variables (which SAM would let override the template's) cannot leak in.
const PASSED_ENV: &[&str] = &["PATH", "HOME", "LANG", "TMPDIR", "DOCKER_HOST"];

/// One test's view of the SAM local setup.
#[derive(Debug)]
pub struct SamLocal {
    root: PathBuf,
    python: PathBuf,
    built_template: PathBuf,
    work: PathBuf,
    parameter_overrides: String,
    env_vars_file: PathBuf,
    extra_env_file: PathBuf,
    jwt_secret: String,
    emulator: String,
    mock_url: String,
}

/// What one `sam local invoke` printed.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The function's response payload, as SAM prints it on stdout.
    pub stdout: Vec<u8>,
    /// SAM's and the function's logs.
    pub stderr: String,
    pub elapsed: Duration,
}

/// A function-URL (HTTP API v2) response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
    /// `body` parsed as JSON (`Null` if it is not JSON).
    pub json: Value,
}

impl SamLocal {
    /// Sets up one deployment for a test (see the module docs).
    pub async fn new() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| HarnessError::Unexpected("no workspace root".into()))?;
        let python = root.join(".venv/bin/python");
        let built_template = root.join(".aws-sam/build/template.yaml");
        for (what, path) in [("the venv", &python), ("sam build output", &built_template)] {
            if !path.exists() {
                return Err(HarnessError::Unexpected(format!(
                    "{what} ({}) is missing; {NEEDS_SAM}",
                    path.display()
                )));
            }
        }
        stack_var("DOCKER_HOST").map_err(|_| missing("DOCKER_HOST"))?;
        let emulator = stack_var("AWS_ENDPOINT_URL_DYNAMODB")?;
        let mock_url = stack_var("GW_MOCK_LLM_URL")?;

        // The secrets, by name only: a prefix of their own per test.
        let prefix = format!("/{}", unique("gw-sam-"));
        let openai_parameter = format!("{prefix}/openai-api-key");
        let jwt_parameter = format!("{prefix}/jwt-secret");
        let jwt_secret = format!("{}{}", unique("jwt-"), unique("-"));
        let ssm = ssm_client(&emulator).await;
        put_secure(&ssm, &openai_parameter, "mock-key-from-ssm").await?;
        put_secure(&ssm, &jwt_parameter, &jwt_secret).await?;

        let work = root.join("target").join("sam-local-tests").join(unique(""));
        std::fs::create_dir_all(&work)?;

        // Template variables SAM cannot resolve locally: `!Ref <table>` would become the
        // logical id; the local tables have the stack's names.
        let mut variables = serde_json::Map::new();
        for variable in [
            "CONVERSATIONS_TABLE",
            "RATE_LIMITS_TABLE",
            "CACHE_TABLE",
            "JOBS_TABLE",
            "API_KEYS_TABLE",
        ] {
            variables.insert(variable.into(), Value::String(stack_var(variable)?));
        }
        // `!GetAtt StreamFunctionUrl.FunctionUrl` exists only once deployed.
        variables.insert(
            "STREAM_FUNCTION_URL".into(),
            Value::String("https://stream.lambda-url.local.invalid/".into()),
        );
        let env_vars_file = work.join("env-vars.json");
        std::fs::write(
            &env_vars_file,
            serde_json::to_vec_pretty(&json!({ "Parameters": variables }))?,
        )?;
        let extra_env_file = work.join("extra-env.json");
        std::fs::write(
            &extra_env_file,
            serde_json::to_vec_pretty(&json!({
                "AWS_ENDPOINT_URL_DYNAMODB": emulator,
                "AWS_ENDPOINT_URL_SSM": emulator,
            }))?,
        )?;
        let parameter_overrides = [
            "Architecture=x86_64".to_owned(),
            format!("OpenAiBaseUrl={}/v1", mock_url.trim_end_matches('/')),
            format!("OpenAiApiKeyParameter={openai_parameter}"),
            format!("JwtKeyParameter={jwt_parameter}"),
            "JwtAlgorithm=HS256".to_owned(),
        ]
        .join(" ");
        Ok(Self {
            root,
            python,
            built_template,
            work,
            parameter_overrides,
            env_vars_file,
            extra_env_file,
            jwt_secret,
            emulator,
            mock_url,
        })
    }

    /// [`SamLocal::new`] for tests: without the setup the test fails loudly, never skips.
    #[allow(
        clippy::panic,
        reason = "a test that cannot reach SAM local must fail loudly, never skip"
    )]
    pub async fn require() -> Self {
        match Self::new().await {
            Ok(sam) => sam,
            Err(err) => panic!("{err}"),
        }
    }

    pub fn emulator(&self) -> &str {
        &self.emulator
    }

    pub fn mock_url(&self) -> &str {
        &self.mock_url
    }

    /// An HS256 token for `user` signed with this deployment's JWT secret (which the functions
    /// can only know from SSM).
    pub fn jwt(&self, user: &str, tier: &str) -> Result<String> {
        crate::mint_jwt(
            &self.jwt_secret,
            &json!({"sub": user, "tier": tier, "exp": crate::jwt_expiry(600)}),
        )
    }

    /// An event fixture from `events/`.
    pub fn event(&self, name: &str) -> Result<Value> {
        let path = self.root.join("events").join(name);
        Ok(serde_json::from_slice(&std::fs::read(&path)?)?)
    }

    /// The base command: the host-network wrapper around the pinned SAM CLI, with a scrubbed
    /// environment (plus dummy credentials for the emulator) and the workspace as cwd.
    fn sam(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.python);
        command
            .arg(self.root.join("infra/sam_host_network.py"))
            .arg("--extra-env")
            .arg(&self.extra_env_file)
            .args(args)
            .current_dir(&self.root)
            .env_clear()
            .envs(
                PASSED_ENV
                    .iter()
                    .filter_map(|k| Some((*k, std::env::var(k).ok()?))),
            )
            .env("SAM_CLI_TELEMETRY", "0")
            .env("AWS_ACCESS_KEY_ID", "local")
            .env("AWS_SECRET_ACCESS_KEY", "local")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        command
    }

    /// The options every `sam local` command of these tests takes.
    fn common_args(&self) -> Vec<String> {
        vec![
            "--template".into(),
            self.built_template.display().to_string(),
            "--parameter-overrides".into(),
            self.parameter_overrides.clone(),
            "--env-vars".into(),
            self.env_vars_file.display().to_string(),
            "--docker-network".into(),
            "host".into(),
            "--skip-pull-image".into(),
            "--region".into(),
            "us-east-1".into(),
        ]
    }

    /// `sam local invoke <function> --event <event>`.
    pub async fn invoke(&self, function: &str, event: &Value) -> Result<Invocation> {
        let event_file = self.work.join(format!("{}.json", unique("event-")));
        std::fs::write(&event_file, serde_json::to_vec(event)?)?;
        let mut args: Vec<String> = vec![
            "local".into(),
            "invoke".into(),
            function.into(),
            "--event".into(),
            event_file.display().to_string(),
        ];
        args.extend(self.common_args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // Output goes to files, so it can still be read (for the container ids) after a timeout.
        let name = unique("invoke-");
        let (stdout_path, stderr_path) = (
            self.work.join(format!("{name}.out")),
            self.work.join(format!("{name}.err")),
        );
        let started = Instant::now();
        let mut child = self
            .sam(&args)
            .stdout(std::fs::File::create(&stdout_path)?)
            .stderr(std::fs::File::create(&stderr_path)?)
            .spawn()?;
        let waited = tokio::time::timeout(INVOKE_TIMEOUT, child.wait()).await;
        if waited.is_err()
            && let Some(pid) = child.id()
        {
            kill_group(pid, "KILL");
            let _ = child.wait().await;
        }
        let invocation = Invocation {
            stdout: std::fs::read(&stdout_path)?,
            stderr: String::from_utf8_lossy(&std::fs::read(&stderr_path)?).into_owned(),
            elapsed: started.elapsed(),
        };
        // SAM removes its container after the invocation; not when it was killed or failed.
        remove_reported_containers(&invocation.stderr);
        match waited {
            Ok(Ok(status)) if status.success() => Ok(invocation),
            Ok(Ok(status)) => Err(HarnessError::Unexpected(format!(
                "sam local invoke {function} exited with {status}:\n{}",
                invocation.stderr
            ))),
            Ok(Err(err)) => Err(err.into()),
            Err(_) => Err(HarnessError::Unexpected(format!(
                "sam local invoke {function} did not finish within {INVOKE_TIMEOUT:?}:\n{}",
                invocation.stderr
            ))),
        }
    }

    /// `sam local start-lambda` on a free port with warm containers, until the guard is dropped.
    pub async fn start_lambda(&self) -> Result<StartLambda> {
        let port = free_port()?;
        let mut args: Vec<String> = vec![
            "local".into(),
            "start-lambda".into(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--warm-containers".into(),
            "EAGER".into(),
        ];
        args.extend(self.common_args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.work.join("start-lambda.log");
        let log_file = std::fs::File::create(&log)?;
        let child = self
            .sam(&args)
            .kill_on_drop(false)
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()?;
        let guard = StartLambda {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(INVOKE_TIMEOUT)
                .build()?,
        };
        guard.wait_ready().await?;
        Ok(guard)
    }
}

impl Drop for SamLocal {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn missing(name: &str) -> HarnessError {
    HarnessError::Unexpected(format!("{name} is not set; {NEEDS_SAM}"))
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Signals a process group we started (`kill -<signal> -- -<pgid>`).
fn kill_group(pgid: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .args([format!("-{signal}"), "--".into(), format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

async fn ssm_client(endpoint: &str) -> aws_sdk_ssm::Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .load()
        .await;
    aws_sdk_ssm::Client::new(&config)
}

async fn put_secure(client: &aws_sdk_ssm::Client, name: &str, value: &str) -> Result<()> {
    client
        .put_parameter()
        .name(name)
        .value(value)
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .overwrite(true)
        .send()
        .await
        .map_err(|e| {
            HarnessError::Unexpected(format!(
                "PutParameter {name}: {}",
                aws_sdk_ssm::error::DisplayErrorContext(&e)
            ))
        })?;
    Ok(())
}

/// A running `sam local start-lambda`. [`StartLambda::stop`] ends it gracefully (SIGTERM, which
/// SAM handles by stopping its warm containers), then removes any container it reported that
/// is still there (SAM 1.170 sometimes leaves one of its EAGER containers behind). Dropping it
/// without `stop` (a failed assertion) does the same from a helper thread.
pub struct StartLambda {
    child: tokio::process::Child,
    url: String,
    log: PathBuf,
    http: reqwest::Client,
}

/// How long SAM gets to remove its containers after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(20);

impl StartLambda {
    async fn wait_ready(&self) -> Result<()> {
        // Warm containers for every function start before the endpoint answers.
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Ok(response) = self
                .http
                .get(format!("{}/2015-03-31/functions", self.url))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                // Any HTTP answer means the server is up (it only routes invocations).
                let _ = response.status();
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Unexpected(format!(
                    "sam local start-lambda did not answer on {} within 180 s; log:\n{}",
                    self.url,
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// The last lines of start-lambda's output (for failure messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Invokes `function` with `event` the way the Lambda Invoke API does; the payload back.
    pub async fn invoke(&self, function: &str, event: &Value) -> Result<(Vec<u8>, Duration)> {
        let started = Instant::now();
        let response = self
            .http
            .post(format!(
                "{}/2015-03-31/functions/{function}/invocations",
                self.url
            ))
            .json(event)
            .send()
            .await?;
        let status = response.status();
        let body = response.bytes().await?.to_vec();
        if !status.is_success() {
            return Err(HarnessError::Unexpected(format!(
                "start-lambda invoke {function}: HTTP {status}: {}\nlog:\n{}",
                String::from_utf8_lossy(&body),
                self.log_tail()
            )));
        }
        Ok((body, started.elapsed()))
    }
}

impl StartLambda {
    /// SIGTERM to the process group, wait for SAM to exit (SIGKILL if it does not in time),
    /// then remove whatever container of it is left.
    pub async fn stop(mut self) {
        let Some(pid) = self.child.id() else { return };
        kill_group(pid, "TERM");
        if tokio::time::timeout(STOP_GRACE, self.child.wait())
            .await
            .is_err()
        {
            kill_group(pid, "KILL");
            let _ = self.child.wait().await;
        }
        remove_reported_containers(&std::fs::read_to_string(&self.log).unwrap_or_default());
    }
}

impl Drop for StartLambda {
    fn drop(&mut self) {
        // `None` once the child has been waited for (after `stop`).
        let Some(pid) = self.child.id() else { return };
        kill_group(pid, "TERM");
        // Read now: the log lives in the test's work dir, which goes away with the test.
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        // Only reached when a test failed before `stop`. The wait ends as soon as SAM has
        // exited, so a later process with a recycled id is never signalled; it is joined, on
        // purpose, so the test process does not exit before SAM and its containers are gone.
        let cleanup = std::thread::spawn(move || {
            let deadline = Instant::now() + STOP_GRACE;
            while leader_alive(pid) {
                if Instant::now() > deadline {
                    kill_group(pid, "KILL");
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            remove_reported_containers(&log);
        });
        let _ = cleanup.join();
    }
}

/// Removes the containers a SAM process reported (`SAM_CONTAINER_ID: <id>` in its log) that
/// are still there. Only those: other tests' containers are theirs to remove.
fn remove_reported_containers(log: &str) {
    let ids: Vec<&str> = log
        .lines()
        .filter_map(|line| line.split("SAM_CONTAINER_ID: ").nth(1))
        .map(str::trim)
        .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    if ids.is_empty() {
        return;
    }
    let _ = std::process::Command::new("docker")
        .args(["rm", "--force"])
        .args(&ids)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether process `pid` still runs as the leader of its own group (not exited, not a zombie).
fn leader_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the command name: state, ppid, pgrp.
    matches!(fields.as_slice(), [state, _, pgrp, ..] if *state != "Z" && *pgrp == pid.to_string())
}

impl Invocation {
    /// The buffered function-URL response SAM printed.
    pub fn http(&self) -> Result<HttpResponse> {
        let text = String::from_utf8_lossy(&self.stdout);
        // The payload is the last line SAM writes to stdout.
        let line = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        let payload: Value = serde_json::from_str(line).map_err(|e| {
            HarnessError::Unexpected(format!(
                "the invocation printed no JSON payload ({e}); stdout:\n{text}\nstderr:\n{}",
                self.stderr
            ))
        })?;
        HttpResponse::from_payload(&payload)
    }
}

impl HttpResponse {
    /// A function-URL response payload: `{statusCode, headers, body, isBase64Encoded}`.
    pub fn from_payload(payload: &Value) -> Result<Self> {
        let status = payload["statusCode"]
            .as_u64()
            .and_then(|s| u16::try_from(s).ok())
            .ok_or_else(|| HarnessError::Unexpected(format!("no statusCode in {payload}")))?;
        let raw = payload["body"].as_str().unwrap_or_default();
        let body = if payload["isBase64Encoded"].as_bool() == Some(true) {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(raw)
                .map_err(|e| HarnessError::Unexpected(format!("body is not base64: {e}")))?;
            String::from_utf8_lossy(&bytes).into_owned()
        } else {
            raw.to_owned()
        };
        let headers = payload["headers"]
            .as_object()
            .map(|h| {
                h.iter()
                    .map(|(k, v)| {
                        (
                            k.to_ascii_lowercase(),
                            v.as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let json = serde_json::from_str(&body).unwrap_or(Value::Null);
        Ok(Self {
            status,
            headers,
            body,
            json,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// A streamed response as the Lambda runtime sends it: a JSON prelude with the status and
/// headers, eight NUL bytes, then the body. (SAM local has no function-URL emulation and
/// passes these bytes through as they are.)
#[derive(Debug, Clone)]
pub struct StreamedResponse {
    pub prelude: Value,
    pub body: Vec<u8>,
}

impl StreamedResponse {
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        const SEPARATOR: [u8; 8] = [0; 8];
        let at = bytes
            .windows(SEPARATOR.len())
            .position(|w| w == SEPARATOR)
            .ok_or_else(|| {
                HarnessError::Unexpected(format!(
                    "no streaming prelude separator in {:?}",
                    String::from_utf8_lossy(bytes)
                ))
            })?;
        let prelude = serde_json::from_slice(&bytes[..at])?;
        Ok(Self {
            prelude,
            body: bytes[at + SEPARATOR.len()..].to_vec(),
        })
    }
}

/// `event` with an extra header (lowercase, as function URLs deliver them).
pub fn with_header(mut event: Value, name: &str, value: &str) -> Value {
    event["headers"][name.to_ascii_lowercase()] = Value::String(value.to_owned());
    event
}

/// `event` with a JSON body.
pub fn with_json_body(mut event: Value, body: &Value) -> Value {
    event["body"] = Value::String(body.to_string());
    event["headers"]["content-type"] = Value::String("application/json".into());
    event
}

/// `event` for another path (`rawPath` and `requestContext.http.path`).
pub fn with_path(mut event: Value, path: &str) -> Value {
    event["rawPath"] = Value::String(path.to_owned());
    event["requestContext"]["http"]["path"] = Value::String(path.to_owned());
    event
}
