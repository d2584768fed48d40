//! The real `admin` binary, end to end.
//!
//! The key lifecycle runs against the local stack's DynamoDB emulator (`AWS_ENDPOINT_URL_DYNAMODB`
//! and `API_KEYS_TABLE`, exported by `python infra/devstack.py run -- cargo nextest run`) and
//! fails, never skips, without it. The JWT and error-path tests need no emulator.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::borrow::BorrowMut;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use shared::ApiError;
use shared::auth::{Authenticator, DynamoApiKeys, JwtVerifier, KeyKind, Tier, hash_api_key};
use shared::config::{JwtAlgorithm, JwtSettings, Secret};

const SECRET: &str = "admin-cli-test-secret-admin-cli-test-secret";

fn stack_var(name: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not set: the admin CLI end-to-end test needs the local DynamoDB \
                 emulator; run under infra/devstack.py run (make test), e.g. \
                 `python infra/devstack.py run -- cargo nextest run`"
            )
        })
}

/// The binary with the caller's environment minus anything that would change what a test
/// means (the local stack exports JWT settings of its own).
fn admin(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_admin"));
    command.args(args);
    for name in [
        "JWT_SECRET",
        "JWT_ALGORITHM",
        "JWT_ISSUER",
        "JWT_AUDIENCE",
        "JWT_PUBLIC_KEY",
    ] {
        command.env_remove(name);
    }
    command
}

fn run(mut command: impl BorrowMut<Command>) -> Output {
    command.borrow_mut().stdin(Stdio::null()).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_fails_with(output: &Output, needle: &str) {
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = text(&output.stderr);
    assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

async fn authenticate(
    auth: &Authenticator,
    key: &str,
) -> Result<shared::auth::Principal, ApiError> {
    let mut headers = HeaderMap::new();
    headers.insert("x-api-key", HeaderValue::from_str(key).unwrap());
    auth.authenticate(&headers, None).await
}

#[tokio::test]
async fn key_lifecycle_create_show_authenticate_revoke() {
    stack_var("AWS_ENDPOINT_URL_DYNAMODB");
    let table = stack_var("API_KEYS_TABLE");
    let user = format!("e2e-{}", uuid::Uuid::new_v4().simple());

    // create: stdout is exactly the key; the hash prefix goes to stderr.
    let output = run(admin(&["keys", "create", "--user", &user, "--tier", "pro"]));
    assert!(output.status.success(), "{output:?}");
    let stdout = text(&output.stdout);
    let key = stdout.strip_suffix('\n').unwrap();
    assert!(
        key.starts_with("gwk_") && !key.contains(char::is_whitespace),
        "{stdout:?}"
    );
    let hash = hash_api_key(key);
    let stderr = text(&output.stderr);
    assert!(stderr.contains(&hash[..12]), "{stderr}");
    assert!(!stderr.contains(key), "the key leaked to stderr");

    // show: user, tier, state; never the key. The key can come from stdin.
    let mut child = admin(&["keys", "show", "--key", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{key}").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let shown = text(&output.stdout);
    assert!(shown.contains(&format!("user: {user}\n")), "{shown}");
    assert!(shown.contains("tier: pro\n"), "{shown}");
    assert!(shown.contains("revoked: false\n"), "{shown}");
    assert!(!shown.contains(key), "show printed the key");

    // The functions' authenticator, on the same table through the real SDK, accepts it.
    let keys = DynamoApiKeys::new(shared::dynamo::client().await, table);
    let auth = Authenticator {
        jwt: None,
        keys: Arc::new(keys),
        allow_anonymous: false,
    };
    let principal = authenticate(&auth, key).await.unwrap();
    assert_eq!(
        (
            principal.user_id.as_str(),
            principal.tier,
            principal.key_kind
        ),
        (user.as_str(), Tier::Pro, KeyKind::ApiKey)
    );

    // revoke by key, then the very next request is a 401.
    let output = run(admin(&["keys", "revoke", "--key", key]));
    assert!(output.status.success(), "{output:?}");
    assert!(text(&output.stdout).contains(&user));
    let err = authenticate(&auth, key).await.unwrap_err();
    assert!(matches!(err, ApiError::Unauthorized), "{err:?}");

    let output = run(admin(&["keys", "show", "--hash", &hash]));
    assert!(
        text(&output.stdout).contains("revoked: true\n"),
        "{output:?}"
    );
    // Revoking again by hash is harmless and says so.
    let output = run(admin(&["keys", "revoke", "--hash", &hash]));
    assert!(output.status.success(), "{output:?}");
    assert!(
        text(&output.stdout).contains("already revoked"),
        "{output:?}"
    );

    // Unknown keys are a clear failure, not a silent success.
    let unknown = hash_api_key(&format!("gwk_{}", uuid::Uuid::new_v4().simple()));
    assert_fails_with(
        &run(admin(&["keys", "revoke", "--hash", &unknown])),
        "no API key with hash",
    );
    assert_fails_with(
        &run(admin(&["keys", "show", "--key", "gwk_never_issued"])),
        "no API key with hash",
    );
}

#[test]
fn dynamodb_failure_is_reported_with_its_cause() {
    stack_var("AWS_ENDPOINT_URL_DYNAMODB");
    let missing = format!("no-such-table-{}", uuid::Uuid::new_v4().simple());
    let output = run(admin(&["keys", "show", "--key", "k", "--table", &missing]));
    assert_fails_with(&output, "DynamoDB request failed");
    assert!(
        text(&output.stderr).contains("ResourceNotFound"),
        "{output:?}"
    );
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/tests/fixtures")
        .join(name)
}

fn verifier(
    algorithm: JwtAlgorithm,
    key: &str,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> JwtVerifier {
    JwtVerifier::new(&JwtSettings {
        algorithm,
        key: Secret::new(key),
        issuer: issuer.map(str::to_owned),
        audience: audience.map(str::to_owned),
        leeway: Duration::ZERO,
    })
    .unwrap()
}

fn minted(output: &Output) -> String {
    assert!(output.status.success(), "{output:?}");
    text(&output.stdout).trim_end().to_owned()
}

#[test]
fn mints_hs256_tokens_the_verifier_accepts() {
    let token = minted(&run(admin(&[
        "jwt",
        "mint",
        "--user",
        "alice",
        "--tier",
        "enterprise",
        "--ttl",
        "15m",
        "--issuer",
        "https://issuer.example",
        "--audience",
        "gateway",
    ])
    .env("JWT_SECRET", SECRET)));
    let principal = verifier(
        JwtAlgorithm::Hs256,
        SECRET,
        Some("https://issuer.example"),
        Some("gateway"),
    )
    .verify(&token)
    .unwrap();
    assert_eq!(
        (
            principal.user_id.as_str(),
            principal.tier,
            principal.key_kind
        ),
        ("alice", Tier::Enterprise, KeyKind::Jwt)
    );
    let claims: serde_json::Value =
        jsonwebtoken::dangerous::insecure_decode_claims(&token).unwrap();
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        900
    );

    // Issuer and audience default to the functions' own variables.
    let token = minted(&run(admin(&["jwt", "mint", "--user", "bob"])
        .env("JWT_SECRET", SECRET)
        .env("JWT_ISSUER", "iss-from-env")
        .env("JWT_AUDIENCE", "aud-from-env")));
    let principal = verifier(
        JwtAlgorithm::Hs256,
        SECRET,
        Some("iss-from-env"),
        Some("aud-from-env"),
    )
    .verify(&token)
    .unwrap();
    assert_eq!(
        (principal.user_id.as_str(), principal.tier),
        ("bob", Tier::Free)
    );
    // A different secret does not verify it.
    let other = verifier(JwtAlgorithm::Hs256, &SECRET.replace('a', "b"), None, None);
    assert!(other.verify(&token).is_err());
}

#[test]
fn mints_rs256_tokens_with_a_private_key_file() {
    let private = fixture("rs256_private.pem");
    let token = minted(&run(admin(&[
        "jwt",
        "mint",
        "--user",
        "carol",
        "--tier",
        "pro",
        "--private-key",
        private.to_str().unwrap(),
    ])
    .env("JWT_ALGORITHM", "RS256")));
    let public = std::fs::read_to_string(fixture("rs256_public.pem")).unwrap();
    let principal = verifier(JwtAlgorithm::Rs256, &public, None, None)
        .verify(&token)
        .unwrap();
    assert_eq!(
        (principal.user_id.as_str(), principal.tier),
        ("carol", Tier::Pro)
    );
}

#[test]
fn failures_exit_1_with_a_clear_message_and_no_panic() {
    assert_fails_with(
        &run(admin(&["jwt", "mint", "--user", "a"])),
        "JWT_SECRET is not set",
    );
    assert_fails_with(
        &run(admin(&["jwt", "mint", "--user", "a"]).env("JWT_SECRET", "short")),
        "at least 32 bytes",
    );
    assert_fails_with(
        &run(admin(&["jwt", "mint", "--user", "a"]).env("JWT_ALGORITHM", "RS256")),
        "--private-key is not set",
    );
    assert_fails_with(
        &run(admin(&[
            "jwt",
            "mint",
            "--user",
            "a",
            "--private-key",
            "/nonexistent/key.pem",
        ])
        .env("JWT_ALGORITHM", "RS256")),
        "cannot read /nonexistent/key.pem",
    );
    let public = fixture("rs256_public.pem");
    assert_fails_with(
        &run(admin(&[
            "jwt",
            "mint",
            "--user",
            "a",
            "--private-key",
            public.to_str().unwrap(),
        ])
        .env("JWT_ALGORITHM", "RS256")),
        "not an RSA private key",
    );
    assert_fails_with(
        &run(admin(&["jwt", "mint", "--user", "a"])
            .env("JWT_ALGORITHM", "none")
            .env("JWT_SECRET", SECRET)),
        "'NONE' is not HS256 or RS256",
    );
    assert_fails_with(
        &run(admin(&["jwt", "mint", "--user", "a", "--ttl", "forever"]).env("JWT_SECRET", SECRET)),
        "not a duration",
    );
    assert_fails_with(
        &run(admin(&["keys", "create", "--user", "alice"]).env_remove("API_KEYS_TABLE")),
        "API_KEYS_TABLE is not set",
    );
    assert_fails_with(
        &run(admin(&[
            "keys",
            "create",
            "--user",
            "anon:1.2.3.4",
            "--table",
            "t",
        ])),
        "reserved",
    );
    assert_fails_with(
        &run(admin(&[
            "keys", "create", "--user", "alice", "--tier", "gold", "--table", "t",
        ])),
        "'gold' is not a tier",
    );
    assert_fails_with(
        &run(admin(&["keys", "revoke", "--hash", "xyz", "--table", "t"])),
        "expected the 64 hex digits",
    );
    assert_fails_with(
        &run(admin(&[
            "keys",
            "show",
            "--key",
            "a",
            "--hash",
            &hash_api_key("a"),
            "--table",
            "t",
        ])),
        "cannot be used with",
    );
    assert_fails_with(&run(admin(&["keys", "show", "--table", "t"])), "required");
    let help = run(admin(&["--help"]));
    assert!(
        help.status.success() && text(&help.stdout).contains("keys"),
        "{help:?}"
    );
}
