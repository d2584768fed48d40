use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use mock_llm::cli::{self, CliError};
use mock_llm::{MockState, run};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> ExitCode {
    let addr = match cli::listen_addr(std::env::args().skip(1), std::env::var(cli::ADDR_ENV).ok()) {
        Ok(addr) => addr,
        Err(CliError::HelpRequested) => return report(cli::USAGE, ExitCode::SUCCESS),
        Err(err) => return report(&err.to_string(), ExitCode::from(2)),
    };
    let listener = match TcpListener::bind(&addr).await {
        Ok(listener) => listener,
        Err(err) => {
            return report(
                &format!("mock-llm: cannot bind {addr}: {err}"),
                ExitCode::FAILURE,
            );
        }
    };
    let bound = listener
        .local_addr()
        .map_or(addr, |local| local.to_string());
    // Parents started with port 0 read this exact line to learn the port.
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "mock-llm listening on http://{bound}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        report(
            "mock-llm: could not write the listening line to stdout",
            ExitCode::SUCCESS,
        );
    }
    drop(stdout);
    match run(listener, Arc::new(MockState::new())).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => report(&format!("mock-llm: server error: {err}"), ExitCode::FAILURE),
    }
}

fn report(message: &str, code: ExitCode) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "{message}");
    code
}
