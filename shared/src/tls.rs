//! The trust roots of every outbound TLS connection (DynamoDB, SSM, the LLM provider), chosen
//! once per process and given to both HTTP stacks.
//!
//! **Default: Mozilla's root program, compiled in** (`webpki-root-certs`), so the cold start reads
//! no certificate file at all. Left to themselves, the AWS SDK's HTTPS client and the OpenAI
//! client's reqwest each load the system store through rustls-native-certs; on Debian that is
//! the bundle *and* every file of `/etc/ssl/certs` (~290), twice, which was the largest part of
//! the init phase (see BENCHMARKS.md). Every endpoint these functions call (AWS service
//! endpoints, OpenAI-compatible providers on the public internet) chains to a root of that
//! program, which is the same list Debian's and Amazon Linux's `ca-certificates` ship.
//!
//! **Override: `SSL_CERT_FILE` / `SSL_CERT_DIR`** (OpenSSL's variables, with OpenSSL's meaning):
//! when either is set, the trust store is exactly the certificates they name, read once and
//! shared by every client. That is how a deployment trusts a private CA, e.g. a self-hosted LLM
//! endpoint behind an internal certificate; the bundle must then also hold the public roots the
//! AWS endpoints need (typically the system bundle with the private CA appended). Lambda does not
//! set these variables itself. If they are set but name no usable certificate, the cold start
//! stops with [`NoTrustRoots`] ([`crate::services::Services::from_env`]) rather than every call
//! failing its handshake later.

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use aws_sdk_dynamodb::config::SharedHttpClient;
use aws_smithy_http_client::tls::rustls_provider::CryptoMode;
use aws_smithy_http_client::tls::{Provider, TlsContext, TrustStore};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;

/// OpenSSL's variable naming a PEM bundle to trust instead of the default roots.
pub const CERT_FILE_VARIABLE: &str = "SSL_CERT_FILE";
/// OpenSSL's variable naming directories (`:`-separated) of PEM certificates to trust.
pub const CERT_DIR_VARIABLE: &str = "SSL_CERT_DIR";

/// Where the roots came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootSource {
    /// Mozilla's root program, compiled into the binary.
    Compiled,
    /// The files named by `SSL_CERT_FILE` / `SSL_CERT_DIR`.
    Environment,
}

/// `SSL_CERT_FILE` / `SSL_CERT_DIR` are set but yield no certificate usable as a trust anchor.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{CERT_FILE_VARIABLE} / {CERT_DIR_VARIABLE} name no usable CA certificate: {detail}")]
pub struct NoTrustRoots {
    detail: String,
}

/// A set of trusted root certificates, each one known to parse as a trust anchor.
#[derive(Debug, Clone)]
pub struct TrustRoots {
    certs: Vec<CertificateDer<'static>>,
    source: RootSource,
}

static ROOTS: LazyLock<Result<TrustRoots, NoTrustRoots>> =
    LazyLock::new(|| TrustRoots::from_lookup(|name| std::env::var(name).ok()));

/// The process's trust roots, decided from the environment at first use.
pub fn roots() -> Result<&'static TrustRoots, NoTrustRoots> {
    ROOTS.as_ref().map_err(Clone::clone)
}

static AWS_HTTP_CLIENT: LazyLock<SharedHttpClient> = LazyLock::new(|| {
    let trust_store = match roots() {
        Ok(roots) => roots.aws_trust_store(),
        // Only tools reach this (a function stops at cold start instead): every TLS call fails.
        Err(err) => {
            tracing::error!(error = %err, "no trust roots: TLS connections to AWS will fail");
            TrustStore::empty()
        }
    };
    let context = TlsContext::builder()
        .with_trust_store(trust_store)
        .build()
        // Cannot fail in aws-smithy-http-client 1.x (the builder only moves its fields).
        .unwrap_or_default();
    aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::AwsLc))
        .tls_context(context)
        .build_https()
});

/// The HTTPS client of every AWS SDK client (DynamoDB, SSM): the SDK's own default (rustls on
/// aws-lc, `TCP_NODELAY`), trusting [`roots`]. One per process, so the clients also share its
/// connection pools.
pub fn aws_http_client() -> SharedHttpClient {
    AWS_HTTP_CLIENT.clone()
}

impl TrustRoots {
    /// Mozilla's root program, compiled in.
    pub fn compiled() -> Self {
        Self {
            certs: webpki_root_certs::TLS_SERVER_ROOT_CERTS.to_vec(),
            source: RootSource::Compiled,
        }
    }

    /// The roots the variables read through `lookup` select: the files named by
    /// `SSL_CERT_FILE` / `SSL_CERT_DIR` when either is set (non-empty), else [`Self::compiled`].
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, NoTrustRoots> {
        let file = lookup(CERT_FILE_VARIABLE)
            .filter(|v| !v.trim().is_empty())
            .map(PathBuf::from);
        let dirs: Vec<PathBuf> = lookup(CERT_DIR_VARIABLE)
            .map(|v| {
                std::env::split_paths(&v)
                    .filter(|p| !p.as_os_str().is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if file.is_none() && dirs.is_empty() {
            return Ok(Self::compiled());
        }
        Self::from_files(file.as_deref(), &dirs)
    }

    /// The certificates of a PEM bundle and of the PEM files in `dirs`. Certificates that do not
    /// parse as trust anchors are left out (the AWS SDK would panic on them).
    pub fn from_files(file: Option<&Path>, dirs: &[PathBuf]) -> Result<Self, NoTrustRoots> {
        let mut loaded = Vec::new();
        let mut problems = Vec::new();
        let sources = file
            .map(|f| (Some(f), None))
            .into_iter()
            .chain(dirs.iter().map(|d| (None, Some(d.as_path()))));
        for (file, dir) in sources {
            let result = rustls_native_certs::load_certs_from_paths(file, dir);
            loaded.extend(result.certs);
            problems.extend(result.errors.iter().map(ToString::to_string));
        }
        let before = loaded.len();
        let mut certs: Vec<CertificateDer<'static>> = loaded
            .into_iter()
            .filter(|cert| RootCertStore::empty().add(cert.clone()).is_ok())
            .collect();
        if certs.len() < before {
            problems.push(format!(
                "{} certificate(s) are not usable as trust anchors",
                before - certs.len()
            ));
        }
        certs.sort_unstable_by(|a, b| a.as_ref().cmp(b.as_ref()));
        certs.dedup();
        if certs.is_empty() {
            if problems.is_empty() {
                problems.push("no certificate found".to_owned());
            }
            return Err(NoTrustRoots {
                detail: problems.join("; "),
            });
        }
        if !problems.is_empty() {
            tracing::warn!(problems = %problems.join("; "), "some CA certificates were skipped");
        }
        Ok(Self {
            certs,
            source: RootSource::Environment,
        })
    }

    pub fn source(&self) -> RootSource {
        self.source
    }

    pub fn len(&self) -> usize {
        self.certs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    /// For reqwest (`ClientBuilder::tls_certs_only`): these roots and no others.
    pub fn reqwest_certificates(&self) -> Result<Vec<reqwest::Certificate>, reqwest::Error> {
        self.certs
            .iter()
            .map(|cert| reqwest::Certificate::from_der(cert))
            .collect()
    }

    /// For the AWS SDK, which takes PEM only: these roots and not the system's.
    fn aws_trust_store(&self) -> TrustStore {
        let mut store = TrustStore::empty();
        for cert in &self.certs {
            store.add_pem_certificate(to_pem(cert));
        }
        store
    }
}

fn to_pem(cert: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", cert.to_vec()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::collections::HashMap;

    use super::*;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| env.get(name).cloned()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tls-roots-{name}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn without_the_variables_the_compiled_roots_are_used() {
        let roots = TrustRoots::from_lookup(lookup(&[("SSL_CERT_FILE", "  ")])).unwrap();
        assert_eq!(roots.source(), RootSource::Compiled);
        assert!(
            roots.len() > 100,
            "Mozilla's program has well over 100 roots"
        );
        assert_eq!(roots.reqwest_certificates().unwrap().len(), roots.len());
    }

    #[test]
    fn ssl_cert_file_replaces_the_compiled_roots() {
        let dir = temp_dir("file");
        let bundle = dir.join("private-ca.pem");
        let first = &webpki_root_certs::TLS_SERVER_ROOT_CERTS[0];
        std::fs::write(&bundle, to_pem(first)).unwrap();
        let roots = TrustRoots::from_lookup(lookup(&[("SSL_CERT_FILE", bundle.to_str().unwrap())]))
            .unwrap();
        assert_eq!(roots.source(), RootSource::Environment);
        assert_eq!(roots.certs, vec![first.clone()]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn ssl_cert_dir_adds_every_file_and_drops_duplicates() {
        let dir = temp_dir("dir");
        let [a, b] = [
            &webpki_root_certs::TLS_SERVER_ROOT_CERTS[0],
            &webpki_root_certs::TLS_SERVER_ROOT_CERTS[1],
        ];
        std::fs::write(dir.join("a.pem"), to_pem(a)).unwrap();
        std::fs::write(dir.join("b.pem"), to_pem(b)).unwrap();
        std::fs::write(dir.join("bundle.pem"), to_pem(a) + &to_pem(b)).unwrap();
        let roots =
            TrustRoots::from_lookup(lookup(&[("SSL_CERT_DIR", dir.to_str().unwrap())])).unwrap();
        assert_eq!(roots.len(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_set_variable_without_usable_certificates_is_an_error_naming_it() {
        let dir = temp_dir("bad");
        let junk = dir.join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        for file in [junk.clone(), dir.join("missing.pem")] {
            let err = TrustRoots::from_lookup(lookup(&[("SSL_CERT_FILE", file.to_str().unwrap())]))
                .unwrap_err();
            assert!(err.to_string().contains("SSL_CERT_FILE"), "{err}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_pem_given_to_the_aws_sdk_parses_back_to_the_same_certificates() {
        use rustls::pki_types::pem::PemObject;
        for cert in TrustRoots::compiled().certs {
            let back = CertificateDer::from_pem_slice(to_pem(&cert).as_bytes()).unwrap();
            assert_eq!(back, cert);
        }
    }

    #[tokio::test]
    async fn a_dynamodb_call_through_the_shared_client_fails_cleanly_without_a_server() {
        // The SDK parses the PEM roots when it first connects and `expect`s each to be valid;
        // a bad one would panic here instead of returning a connection error.
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                "AKIDLOCAL",
                "local",
                None,
                None,
                "test",
            ))
            .endpoint_url("https://127.0.0.1:1")
            .http_client(aws_http_client())
            .retry_config(aws_sdk_dynamodb::config::retry::RetryConfig::disabled())
            .build();
        let client = aws_sdk_dynamodb::Client::from_conf(config);
        let err = client.list_tables().send().await.unwrap_err();
        assert!(err.as_service_error().is_none(), "{err:?}");
    }
}
