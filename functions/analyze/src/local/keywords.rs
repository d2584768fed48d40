//! Keyword extraction.
//!
//! Chinese: jieba-rs TF-IDF over its bundled IDF table, configured and ordered the way Python's
//! `jieba.analyse.extract_tags` is (HMM segmentation for unknown words, ties kept in order of
//! first appearance), so results agree with the reference the original design used; or jieba-rs
//! TextRank restricted to nouns and verbs. English: term frequency over content words (stop
//! words removed, general-purpose words halved, plurals folded into their singular), or
//! TextRank over the co-occurrence graph of content words.

use std::collections::{HashMap, HashSet};

use jieba_rs::{Jieba, KeywordExtract, TextRank, TfIdf};

use super::lexicon::{EN_GENERAL_WORDS, EN_STOP_WORDS};
use super::rank::pagerank;
use super::text::{normalize_word, words};
use crate::response::Keyword;

/// Parts of speech Python's `textrank` keeps by default (place names, nouns, verbal nouns,
/// verbs).
const ZH_TEXTRANK_POS: [&str; 4] = ["ns", "n", "vn", "v"];

/// Words closer than this in the sequence of content words are linked (jieba's span).
const CO_OCCURRENCE_SPAN: usize = 5;

/// Weights equal to this precision are ties, broken by first appearance.
fn tie_key(weight: f64) -> i64 {
    // `as` saturates; weights are finite and small.
    (weight * 1e9).round() as i64
}

/// The `top_k` heaviest keywords, given each with the position of its first appearance: by
/// weight, ties (to [`tie_key`]'s precision) going to the earlier word.
fn top_ranked(
    candidates: impl IntoIterator<Item = (usize, Keyword)>,
    top_k: usize,
) -> Vec<Keyword> {
    let mut ranked: Vec<(i64, usize, Keyword)> = candidates
        .into_iter()
        .map(|(first, keyword)| (tie_key(keyword.weight), first, keyword))
        .collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    ranked.into_iter().take(top_k).map(|(_, _, k)| k).collect()
}

/// TF-IDF keywords of Chinese `text`, with jieba part-of-speech tags.
pub fn chinese_tfidf(jieba: &Jieba, tfidf: &TfIdf, text: &str, top_k: usize) -> Vec<Keyword> {
    // Every candidate, so ties at the cut can be ordered by first appearance as the reference
    // does (jieba-rs breaks them alphabetically).
    let candidates = tfidf.extract_keywords(jieba, text, usize::MAX, Vec::new());
    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    for (i, token) in jieba.cut(text, true).into_iter().enumerate() {
        first_seen.entry(token.word).or_insert(i);
    }
    let ranked = candidates
        .into_iter()
        // The reference ignores tokens shorter than two characters once trimmed; jieba-rs
        // counts untrimmed ones, so a "\r\n" could otherwise become a keyword.
        .filter(|k| k.keyword.trim().chars().count() >= 2)
        .map(|k| {
            let first = first_seen
                .get(k.keyword.as_str())
                .copied()
                .unwrap_or(usize::MAX);
            let keyword = Keyword {
                word: k.keyword,
                weight: k.weight,
                pos: (!k.tag.is_empty()).then_some(k.tag),
            };
            (first, keyword)
        });
    top_ranked(ranked, top_k)
}

/// TextRank keywords of Chinese `text` (nouns, place names and verbs), weights scaled to a
/// maximum of 1.
pub fn chinese_textrank(
    jieba: &Jieba,
    textrank: &TextRank,
    text: &str,
    top_k: usize,
) -> Vec<Keyword> {
    let allowed = ZH_TEXTRANK_POS.iter().map(|p| (*p).to_owned()).collect();
    let found: Vec<_> = textrank
        .extract_keywords(jieba, text, top_k, allowed)
        .into_iter()
        .filter(|k| k.weight.is_finite() && k.weight >= 0.0)
        .collect();
    // jieba-rs returns raw PageRank sums; Python's jieba scales them by the largest.
    let max = found.iter().map(|k| k.weight).fold(0.0, f64::max);
    found
        .into_iter()
        .map(|k| Keyword {
            word: k.keyword,
            weight: if max > 0.0 { k.weight / max } else { 0.0 },
            pos: (!k.tag.is_empty()).then_some(k.tag),
        })
        .collect()
}

/// One content word of English text, in order of appearance.
struct Term {
    /// Normalised form (lowercase, possessive dropped, plural folded).
    key: String,
    /// As written.
    surface: String,
}

/// The content words of English `text`: lowercased, possessives dropped, stop words, numbers
/// and one-letter words removed, and a plural folded into its singular when the text uses the
/// singular too.
fn english_terms(text: &str) -> Vec<Term> {
    let stop: HashSet<&str> = EN_STOP_WORDS.iter().copied().collect();
    let mut terms: Vec<Term> = words(text)
        .into_iter()
        .filter_map(|w| {
            let mut key = normalize_word(w.text);
            let mut surface = w.text.replace('’', "'");
            for suffix in ["'s", "'"] {
                if key.len() > suffix.len() + 1 && key.ends_with(suffix) {
                    key.truncate(key.len() - suffix.len());
                    surface.truncate(surface.len() - suffix.len());
                    break;
                }
            }
            let letters = key.chars().filter(|c| c.is_alphabetic()).count();
            (letters > 0 && key.chars().count() >= 2 && !stop.contains(key.as_str()))
                .then_some(Term { key, surface })
        })
        .collect();
    let vocabulary: HashSet<String> = terms.iter().map(|t| t.key.clone()).collect();
    for term in &mut terms {
        if let Some(singular) = singular_in(&term.key, &vocabulary) {
            term.key = singular;
        }
    }
    terms
}

/// The singular of `word` if it looks like a plural and the singular occurs in `vocabulary`.
fn singular_in(word: &str, vocabulary: &HashSet<String>) -> Option<String> {
    if word.len() < 4 || word.ends_with("ss") || word.ends_with("us") || word.ends_with("is") {
        return None;
    }
    let candidates = [
        word.strip_suffix("ies").map(|stem| format!("{stem}y")),
        word.strip_suffix("es").map(str::to_owned),
        word.strip_suffix('s').map(str::to_owned),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|c| c.len() >= 2 && vocabulary.contains(c))
}

/// For each normalised key: how often it occurs, where it first occurs, and how it is written.
struct TermStats {
    count: usize,
    first: usize,
    surfaces: Vec<(String, usize)>,
}

impl TermStats {
    /// This term as a ranking candidate for [`top_ranked`]: an English keyword (no tag) of
    /// `weight`, with its first position.
    fn candidate(&self, key: &str, weight: f64) -> (usize, Keyword) {
        let keyword = Keyword {
            word: self.display(key),
            weight,
            pos: None,
        };
        (self.first, keyword)
    }

    /// The most frequent spelling; on a tie a lowercase one (a capital at the start of a
    /// sentence means nothing), then the normalised form itself (the singular), then the first.
    fn display(&self, key: &str) -> String {
        let rank = |(surface, count): &(String, usize)| {
            (
                *count,
                !surface.chars().any(char::is_uppercase),
                surface.as_str() == key,
            )
        };
        let mut best: Option<&(String, usize)> = None;
        for entry in &self.surfaces {
            if best.is_none_or(|b| rank(entry) > rank(b)) {
                best = Some(entry);
            }
        }
        best.map(|(s, _)| s.clone()).unwrap_or_default()
    }
}

fn stats(terms: &[Term]) -> (Vec<String>, HashMap<String, TermStats>) {
    let mut order = Vec::new();
    let mut map: HashMap<String, TermStats> = HashMap::new();
    for (i, term) in terms.iter().enumerate() {
        let entry = map.entry(term.key.clone()).or_insert_with(|| {
            order.push(term.key.clone());
            TermStats {
                count: 0,
                first: i,
                surfaces: Vec::new(),
            }
        });
        entry.count += 1;
        match entry.surfaces.iter_mut().find(|(s, _)| *s == term.surface) {
            Some(slot) => slot.1 += 1,
            None => entry.surfaces.push((term.surface.clone(), 1)),
        }
    }
    (order, map)
}

/// TF-IDF keywords of English `text`: term frequency over content words, general-purpose words
/// at half weight.
pub fn english_tfidf(text: &str, top_k: usize) -> Vec<Keyword> {
    let terms = english_terms(text);
    let total = terms.len();
    if total == 0 {
        return Vec::new();
    }
    let general: HashSet<&str> = EN_GENERAL_WORDS.iter().copied().collect();
    let (order, map) = stats(&terms);
    let ranked = order.iter().filter_map(|key| {
        let s = map.get(key)?;
        let idf = if general.contains(key.as_str()) {
            0.5
        } else {
            1.0
        };
        let weight = s.count as f64 / total as f64 * idf;
        Some(s.candidate(key, weight))
    });
    top_ranked(ranked, top_k)
}

/// TextRank keywords of English `text`: PageRank over content words linked when they occur
/// within [`CO_OCCURRENCE_SPAN`] content words of each other; weights scaled to a maximum of 1.
pub fn english_textrank(text: &str, top_k: usize) -> Vec<Keyword> {
    let terms = english_terms(text);
    let (order, map) = stats(&terms);
    if order.is_empty() {
        return Vec::new();
    }
    let index: HashMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_str(), i))
        .collect();
    let ids: Vec<usize> = terms
        .iter()
        .filter_map(|t| index.get(t.key.as_str()).copied())
        .collect();
    let mut weights: HashMap<(usize, usize), f64> = HashMap::new();
    for (i, &a) in ids.iter().enumerate() {
        for &b in ids.iter().skip(i + 1).take(CO_OCCURRENCE_SPAN - 1) {
            if a != b {
                *weights.entry((a.min(b), a.max(b))).or_insert(0.0) += 1.0;
            }
        }
    }
    let mut adjacency = vec![Vec::new(); order.len()];
    for (&(a, b), &w) in &weights {
        adjacency[a].push((b, w));
        adjacency[b].push((a, w));
    }
    let scores = pagerank(&adjacency, 0.85, 50);
    let max = scores.iter().copied().fold(0.0, f64::max);
    let ranked = order.iter().zip(&scores).filter_map(|(key, score)| {
        let s = map.get(key)?;
        let weight = if max > 0.0 { score / max } else { 0.0 };
        Some(s.candidate(key, weight))
    });
    top_ranked(ranked, top_k)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const LAMBDA_TEXT: &str = "Serverless functions scale with demand. A function runs only when \
        a request arrives, and the provider bills each function by its duration. Cold starts \
        are the price: a function that loads large dictionaries at start-up answers its first \
        request late. Teams shrink packages and load dictionaries lazily to keep cold starts short.";

    fn words_of(keywords: &[Keyword]) -> Vec<&str> {
        keywords.iter().map(|k| k.word.as_str()).collect()
    }

    #[test]
    fn english_tfidf_ranks_the_topic_words_first_and_folds_plurals() {
        let keywords = english_tfidf(LAMBDA_TEXT, 6);
        let top = words_of(&keywords);
        assert_eq!(top[0], "function", "{top:?}");
        for expected in ["dictionaries", "cold", "starts", "request"] {
            assert!(top.contains(&expected), "{expected} missing from {top:?}");
        }
        assert!(
            !top.iter()
                .any(|w| EN_STOP_WORDS.contains(&w.to_lowercase().as_str())),
            "{top:?}"
        );
        assert!(keywords.windows(2).all(|w| w[0].weight >= w[1].weight));
        // "functions" and "function" are one term, counted together (4 of 5 mentions).
        assert_eq!(top.iter().filter(|w| w.starts_with("function")).count(), 1);
    }

    #[test]
    fn english_keywords_keep_the_most_frequent_spelling_and_drop_possessives() {
        let keywords = english_tfidf(
            "AWS bills. The AWS console. aws's pricing. Pricing pages.",
            3,
        );
        assert_eq!(words_of(&keywords)[0], "AWS");
        assert_eq!(keywords[0].weight, 3.0 / 8.0);
    }

    #[test]
    fn english_textrank_prefers_well_connected_words() {
        let keywords = english_textrank(LAMBDA_TEXT, 3);
        assert_eq!(words_of(&keywords)[0], "function");
        assert_eq!(keywords[0].weight, 1.0);
    }

    #[test]
    fn text_without_content_words_has_no_keywords() {
        assert!(english_tfidf("the and of it is 42 !!", 10).is_empty());
        assert!(english_textrank("", 10).is_empty());
    }
}
