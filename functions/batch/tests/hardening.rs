//! What batch's router does with requests that `cargo lambda watch` cannot deliver as they are
//! (issue 11): a browser origin, a non-UTF-8 JSON body, non-ASCII and repeated API keys. The
//! checks are the same for every function: `test_support::hardening`.

test_support::router_hardening_tests!(|services| batch::app(batch::Batch::new(services)), "/batch");
