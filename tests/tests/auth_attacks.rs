//! Attacks on authentication through the function URLs (issue 11), against the stack's HS256
//! configuration: forged, confused, expired, tampered, truncated and oversized tokens, and bad
//! API keys, on a secured route of every function. Every one is a 401 with the very same body
//! (only `request_id` differs), so a response never tells which check failed, and none reaches
//! the upstream. The verifier's unit tests (shared/src/auth) cover the same cases below HTTP;
//! the RS256 variants (key confusion with the public key, issuer and audience) run against the
//! audit stack (tests/audit_rs256_attacks.rs).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use integration_tests::forge::{self, ATTACKER_RS256_PRIVATE, TRUSTED_RS256_PUBLIC};
use integration_tests::{
    Caller, Credential, FUNCTIONS, Reply, Stack, jwt_expiry, mint_jwt, stack_var, unique,
};
use jsonwebtoken::Algorithm;
use reqwest::Method;
use serde_json::{Value, json};
use shared::auth::Tier;

/// A request to a secured operation, built for one credential.
type Route = (&'static str, Method, String, Option<Value>);

/// One secured route per function, from its OpenAPI document (the first operation that requires
/// credentials), plus `POST /chat/chat`, which would call the upstream if it let one through.
async fn secured_routes(stack: &Stack, marker: &str) -> Vec<Route> {
    let mut routes = vec![(
        "chat",
        Method::POST,
        "chat".to_owned(),
        Some(json!({"message": format!("let me in {marker}")})),
    )];
    for function in FUNCTIONS {
        let doc = stack.openapi(function).await.unwrap();
        let first = doc["paths"].as_object().and_then(|paths| {
            paths.iter().find_map(|(path, item)| {
                let (method, op) = item
                    .as_object()?
                    .iter()
                    .find(|(_, op)| op.get("security").is_some())?;
                let body = op.get("requestBody").map(|_| json!({}));
                Some((
                    method.to_uppercase().parse().ok()?,
                    path.replace("{id}", &uuid::Uuid::new_v4().to_string()),
                    body,
                ))
            })
        });
        if let Some((method, path, body)) = first {
            routes.push((
                function,
                method,
                path.trim_start_matches('/').to_owned(),
                body,
            ));
        }
    }
    routes
}

async fn attempt(stack: &Stack, route: &Route, headers: &[(&str, String)]) -> Reply {
    let (function, method, path, body) = route;
    let mut request = stack
        .http()
        .request(method.clone(), stack.url(function, path));
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    stack.send(request).await.unwrap()
}

/// The body without its per-request id.
fn comparable(reply: &Reply) -> String {
    let mut body = reply.json.clone();
    if body["error"].get("request_id").is_some() {
        body["error"]["request_id"] = Value::Null;
    }
    body.to_string()
}

#[tokio::test]
async fn every_forged_or_bad_credential_is_the_same_401_on_every_function() {
    let stack = Stack::require();
    assert_eq!(
        std::env::var("JWT_ALGORITHM").as_deref().unwrap_or("HS256"),
        "HS256",
        "this suite attacks the stack's HS256 configuration"
    );
    let secret = stack_var("JWT_SECRET").unwrap();
    let marker = unique("attack");
    let claims = forge::claims();
    let valid = mint_jwt(&secret, &claims).unwrap();
    let revoked = stack.new_user(Tier::Pro).await.unwrap();
    assert!(stack.revoke(&revoked).await.unwrap());
    let good_key = stack.new_user(Tier::Pro).await.unwrap();
    let good_key = good_key.api_key().unwrap().to_owned();
    let with = |extra: Value| {
        let mut c = claims.clone();
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let signed = |c: &Value| mint_jwt(&secret, c).unwrap();
    let bearer = |token: &str| vec![("authorization", format!("Bearer {token}"))];
    let none_header = json!({"alg": "none", "typ": "JWT"});
    let valid_signature = valid.rsplit('.').next().unwrap().to_owned();

    let attacks: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("no credentials", vec![]),
        (
            "alg none, no signature",
            bearer(&forge::raw(&none_header, &claims, "")),
        ),
        (
            "alg none with a real signature",
            bearer(&forge::raw(&none_header, &claims, &valid_signature)),
        ),
        (
            "alg NONE",
            bearer(&forge::raw(&json!({"alg": "NONE"}), &claims, "")),
        ),
        (
            "HS384 with the real secret",
            bearer(&forge::hmac(Algorithm::HS384, secret.as_bytes(), &claims).unwrap()),
        ),
        (
            "HS512 with the real secret",
            bearer(&forge::hmac(Algorithm::HS512, secret.as_bytes(), &claims).unwrap()),
        ),
        (
            "RS256 signed by a stranger's key",
            bearer(&forge::rsa(Algorithm::RS256, ATTACKER_RS256_PRIVATE, &claims).unwrap()),
        ),
        (
            "HS256 with an RSA public key as the secret",
            bearer(
                &forge::hmac(Algorithm::HS256, TRUSTED_RS256_PUBLIC.as_bytes(), &claims).unwrap(),
            ),
        ),
        (
            "HS256 with another secret",
            bearer(
                &forge::hmac(Algorithm::HS256, format!("{secret}x").as_bytes(), &claims).unwrap(),
            ),
        ),
        (
            "expired",
            bearer(&signed(&with(json!({"exp": jwt_expiry(-3600)})))),
        ),
        (
            "expired beyond the leeway",
            bearer(&signed(&with(json!({"exp": jwt_expiry(-120)})))),
        ),
        (
            "not yet valid",
            bearer(&signed(&with(json!({"nbf": jwt_expiry(3600)})))),
        ),
        (
            "exp as a string",
            bearer(&signed(&with(json!({"exp": jwt_expiry(600).to_string()})))),
        ),
        ("no exp", bearer(&signed(&with(json!({"exp": null}))))),
        ("no sub", bearer(&signed(&with(json!({"sub": null}))))),
        ("empty sub", bearer(&signed(&with(json!({"sub": ""}))))),
        (
            "sub in the anonymous namespace",
            bearer(&signed(&with(json!({"sub": "anon:127.0.0.1"})))),
        ),
        (
            "unknown tier",
            bearer(&signed(&with(json!({"tier": "admin"})))),
        ),
        (
            "tampered payload (tier raised)",
            bearer(&forge::tampered(
                &valid,
                &with(json!({"tier": "enterprise"})),
            )),
        ),
        (
            "tampered payload (sub changed)",
            bearer(&forge::tampered(
                &valid,
                &with(json!({"sub": "someone-else"})),
            )),
        ),
        ("truncated signature", bearer(&valid[..valid.len() - 8])),
        (
            "signature removed",
            bearer(&format!("{}.", valid.rsplit_once('.').unwrap().0)),
        ),
        ("two segments", bearer(valid.rsplit_once('.').unwrap().0)),
        ("garbage", bearer("not.a.jwt")),
        (
            "oversized but validly signed",
            bearer(&signed(&with(json!({"pad": "p".repeat(9_000)})))),
        ),
        (
            "basic scheme",
            vec![("authorization", format!("Basic {}", good_key))],
        ),
        (
            "bearer without a token",
            vec![("authorization", "Bearer ".to_owned())],
        ),
        (
            "unknown API key",
            vec![("x-api-key", shared::auth::generate_api_key())],
        ),
        (
            "unknown API key as bearer",
            bearer(&shared::auth::generate_api_key()),
        ),
        (
            "revoked API key",
            vec![("x-api-key", revoked.api_key().unwrap().to_owned())],
        ),
        (
            "API key prefix only",
            vec![("x-api-key", shared::auth::API_KEY_PREFIX.to_owned())],
        ),
        (
            "valid API key with a suffix",
            vec![("x-api-key", format!("{good_key}0"))],
        ),
        ("bad bearer beside a valid X-API-Key (no fallback)", {
            let mut h = bearer("not.a.jwt");
            h.push(("x-api-key", good_key.clone()));
            h
        }),
    ];

    let routes = secured_routes(&stack, &marker).await;
    assert!(routes.len() >= 2, "no secured routes found: {routes:?}");
    let mut bodies: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut wrong = Vec::new();
    for route in &routes {
        for (what, headers) in &attacks {
            let reply = attempt(&stack, route, headers).await;
            let name = format!("{} {} {} [{what}]", route.0, route.1, route.2);
            if reply.status != 401 || reply.error_code() != Some("invalid_credentials") {
                wrong.push(format!("{name}: expected the 401 envelope, got\n{reply}"));
                continue;
            }
            if reply.header("x-request-id") != reply.json["error"]["request_id"].as_str() {
                wrong.push(format!("{name}: request_id differs from x-request-id"));
            }
            bodies.entry(comparable(&reply)).or_default().push(name);
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
    assert_eq!(
        bodies.len(),
        1,
        "every rejection must carry the same body; the variants were {bodies:#?}"
    );
    assert!(
        stack
            .upstream_requests_with(&marker)
            .await
            .unwrap()
            .is_empty(),
        "a rejected request reached the upstream"
    );

    // The control: the same routes accept the genuine token and key.
    for route in &routes {
        for headers in [bearer(&valid), vec![("x-api-key", good_key.clone())]] {
            let reply = attempt(&stack, route, &headers).await;
            assert_ne!(
                reply.status, 401,
                "{} {}: genuine credentials refused:\n{reply}",
                route.0, route.2
            );
        }
    }
}

/// Credentials never come back in a response, whatever happens to the request.
#[tokio::test]
async fn credentials_are_never_echoed_in_responses() {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let key = user.api_key().unwrap().to_owned();
    let jwt_user = stack.jwt_user(Some(Tier::Pro)).await.unwrap();
    let Credential::Bearer(token) = &jwt_user.credential else {
        panic!("jwt_user must present a bearer token")
    };
    let mut replies = Vec::new();
    for caller in [&user, &jwt_user] {
        replies.push(
            stack
                .chat(caller, &json!({"message": format!("echo {}", unique("e"))}))
                .await
                .unwrap(),
        );
        replies.push(stack.chat(caller, &json!({"message": ""})).await.unwrap());
        replies.push(
            stack
                .get("chat", "conversations/not-a-uuid", caller)
                .await
                .unwrap(),
        );
        replies.push(stack.get("chat", "no-such-route", caller).await.unwrap());
    }
    let truncated = Caller::presenting(Credential::Bearer(token[..token.len() - 3].to_owned()));
    replies.push(stack.get("chat", "models", &truncated).await.unwrap());
    let signature = token.rsplit('.').next().unwrap();
    for reply in &replies {
        let everything = format!("{reply}");
        assert!(
            !everything.contains(&key),
            "the API key came back:\n{reply}"
        );
        assert!(
            !everything.contains(signature),
            "the JWT came back:\n{reply}"
        );
    }
}
