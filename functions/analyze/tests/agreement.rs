//! Agreement of the local Chinese TF-IDF keywords with the reference the original design used,
//! Python jieba's `jieba.analyse.extract_tags(text, topK=10)`, on the paragraphs of
//! `tests/fixtures/zh_paragraphs.txt` (written for this project).
//!
//! The reference runs live when a Python with jieba is found (`ANALYZE_REFERENCE_PYTHON`, the
//! workspace's `.venv/bin/python`, or `python3` on PATH); the committed
//! `tests/fixtures/zh_reference_keywords.json` (made by `scripts/jieba_reference.py --write`) is
//! then checked to still match it. Without Python the committed fixture is the reference.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::panic
)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use analyze::local::LocalAnalyzer;
use analyze::request::{KeywordAlgorithm, Language};
use serde::Deserialize;

const PARAGRAPHS: &str = include_str!("fixtures/zh_paragraphs.txt");
const FIXTURE: &str = include_str!("fixtures/zh_reference_keywords.json");
const TOP_K: usize = 10;
/// The bound the issue sets for the mean top-10 overlap.
const REQUIRED_MEAN_OVERLAP: f64 = 0.8;

#[derive(Debug, Deserialize, PartialEq)]
struct Reference {
    jieba: String,
    top_k: usize,
    keywords: Vec<Vec<String>>,
}

fn paragraphs() -> Vec<&'static str> {
    PARAGRAPHS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python_candidates() -> Vec<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(explicit) = std::env::var("ANALYZE_REFERENCE_PYTHON") {
        candidates.push(PathBuf::from(explicit));
    }
    candidates.push(crate_dir().join("../../.venv/bin/python"));
    candidates.push(PathBuf::from("python3"));
    candidates
}

/// The reference computed now by Python jieba, if an interpreter with jieba is available.
fn live_reference() -> Option<Reference> {
    let script = crate_dir().join("scripts/jieba_reference.py");
    let input = crate_dir().join("tests/fixtures/zh_paragraphs.txt");
    for python in python_candidates() {
        if python.is_absolute() && !Path::new(&python).exists() {
            continue;
        }
        let Ok(output) = Command::new(&python).arg(&script).arg(&input).output() else {
            continue;
        };
        if output.status.success()
            && let Ok(reference) = serde_json::from_slice::<Reference>(&output.stdout)
        {
            eprintln!(
                "reference: live, {} (jieba {})",
                python.display(),
                reference.jieba
            );
            return Some(reference);
        }
    }
    None
}

fn overlap(ours: &[String], reference: &[String]) -> f64 {
    let theirs: HashSet<&String> = reference.iter().collect();
    let shared = ours.iter().filter(|w| theirs.contains(w)).count();
    shared as f64 / reference.len().max(ours.len()).max(1) as f64
}

#[test]
fn tfidf_keywords_agree_with_python_jieba_on_24_paragraphs() {
    let fixture: Reference = serde_json::from_str(FIXTURE).unwrap();
    let reference = match live_reference() {
        Some(live) => {
            if live.jieba == fixture.jieba {
                assert_eq!(
                    live, fixture,
                    "the committed fixture no longer matches Python jieba; regenerate it with \
                     scripts/jieba_reference.py --write"
                );
            }
            live
        }
        None => {
            eprintln!("reference: committed fixture (no Python with jieba found)");
            fixture
        }
    };
    let paragraphs = paragraphs();
    assert!(
        paragraphs.len() >= 20,
        "the bound needs at least 20 paragraphs"
    );
    assert_eq!(reference.keywords.len(), paragraphs.len());
    assert_eq!(reference.top_k, TOP_K);

    let local = LocalAnalyzer::new();
    let mut total = 0.0;
    for (i, (text, expected)) in paragraphs.iter().zip(&reference.keywords).enumerate() {
        let ours: Vec<String> = local
            .keywords(text, Language::Zh, TOP_K, KeywordAlgorithm::Tfidf)
            .items
            .into_iter()
            .map(|k| k.word)
            .collect();
        let score = overlap(&ours, expected);
        if score < 1.0 {
            eprintln!(
                "paragraph {i}: overlap {score:.1}\n  ours:      {ours:?}\n  reference: {expected:?}"
            );
        }
        total += score;
    }
    let mean = total / paragraphs.len() as f64;
    eprintln!(
        "mean top-{TOP_K} overlap with jieba.analyse.extract_tags over {} paragraphs: {mean:.3}",
        paragraphs.len()
    );
    assert!(
        mean >= REQUIRED_MEAN_OVERLAP,
        "mean overlap {mean:.3} is below {REQUIRED_MEAN_OVERLAP}"
    );
}
