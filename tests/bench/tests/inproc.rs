//! Smoke test of the in-process overhead loop that `make bench` runs at full length: every
//! scenario completes with the answers it expects (a miss reaches the model, a hit does not).

use bench::{Harness, Scenario, percentile, summarize};
use std::time::Duration;

#[tokio::test]
async fn every_scenario_runs_and_checks_its_answers() -> Result<(), bench::BenchError> {
    for scenario in Scenario::ALL {
        let harness = Harness::new()?;
        let samples = harness.run(scenario, 3, 25).await?;
        assert_eq!(samples.len(), 25, "{}", scenario.name());
        let summary = summarize(scenario, samples);
        assert!(summary.p50_us > 0.0 && summary.p99_us >= summary.p50_us);
    }
    Ok(())
}

#[test]
fn percentile_is_nearest_rank() {
    let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
    assert_eq!(percentile(&samples, 50.0), Duration::from_micros(50));
    assert_eq!(percentile(&samples, 99.0), Duration::from_micros(99));
    assert_eq!(percentile(&samples, 100.0), Duration::from_micros(100));
    assert_eq!(percentile(&[], 50.0), Duration::ZERO);
}
