//! What analyze's router does with requests that `cargo lambda watch` cannot deliver as they are
//! (issue 11): a browser origin, a non-UTF-8 JSON body, non-ASCII and repeated API keys. The
//! checks are the same for every function: `test_support::hardening`.

test_support::router_hardening_tests!(
    {
        // One local analyser (its dictionaries) for every router a test makes.
        let local = std::sync::Arc::new(analyze::local::LocalAnalyzer::new());
        move |services| analyze::app_with_local(services, local.clone())
    },
    "/analyze"
);
