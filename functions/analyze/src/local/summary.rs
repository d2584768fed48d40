//! Extractive summary: TextRank over sentences.
//!
//! Sentences are nodes; two sentences are linked by the similarity of the original TextRank
//! paper, `|shared words| / (ln|Si| + ln|Sj|)`, over their content words (jieba words for
//! Chinese, lowercase words for English, stop words left out). The best-ranked sentences are
//! returned in the order of the text, ties going to the earlier sentence. When the text has no
//! more sentences than requested it is returned whole; when no two sentences share a word the
//! ranking is flat and the summary is the lead sentences.
//!
//! The sentence graph is quadratic in the number of sentences. Above
//! [`MAX_TEXTRANK_SENTENCES`] (long documents, or a client sending 50 000 characters of
//! near-identical sentences) each sentence is instead scored by how many other sentences share
//! each of its words, `Σ (sentences containing w − 1) / (1 + ln|S|)`: the centroid score, in
//! linear time, with the same length normalisation as the TextRank similarity.

use std::collections::{HashMap, HashSet};

use jieba_rs::Jieba;

use super::lexicon::{EN_STOP_WORDS, ZH_STOP_WORDS};
use super::rank::pagerank;
use super::text::{Sentence, is_han, normalize_word, split_sentences, words};

/// Sentences ranked with TextRank at most; longer texts use the linear centroid score.
pub const MAX_TEXTRANK_SENTENCES: usize = 300;

/// The summary: chosen sentences in text order.
pub fn summarize(content: &str, n: usize, jieba: Option<&Jieba>) -> Vec<String> {
    let sentences = split_sentences(content);
    if sentences.len() <= n {
        return sentences
            .iter()
            .map(|s| s.text(content).to_owned())
            .collect();
    }
    let bags: Vec<HashSet<String>> = sentences
        .iter()
        .map(|s| content_words(s, content, jieba))
        .collect();
    let scores = if bags.len() <= MAX_TEXTRANK_SENTENCES {
        pagerank(&similarity_graph(&bags), 0.85, 50)
    } else {
        centroid_scores(&bags)
    };
    let mut order: Vec<usize> = (0..sentences.len()).collect();
    order.sort_by(|&a, &b| {
        // Scores are finite sums of finite weights; quantise so near-equal scores are ties.
        let key = |i: usize| (scores.get(i).copied().unwrap_or(0.0) * 1e9).round() as i64;
        key(b).cmp(&key(a)).then(a.cmp(&b))
    });
    let mut chosen: Vec<usize> = order.into_iter().take(n).collect();
    chosen.sort_unstable();
    chosen
        .into_iter()
        .filter_map(|i| sentences.get(i))
        .map(|s| s.text(content).to_owned())
        .collect()
}

/// Joins summary sentences: Chinese ones directly, others with a space.
pub fn join(sentences: &[String]) -> String {
    let mut text = String::new();
    for sentence in sentences {
        let chinese_boundary = text.chars().last().is_some_and(is_cjk_punctuation_or_han)
            && sentence.chars().next().is_some_and(is_han);
        if !text.is_empty() && !chinese_boundary {
            text.push(' ');
        }
        text.push_str(sentence);
    }
    text
}

fn is_cjk_punctuation_or_han(c: char) -> bool {
    is_han(c) || matches!(c, '。' | '！' | '？' | '”' | '」' | '』' | '）' | '…')
}

fn content_words(sentence: &Sentence, content: &str, jieba: Option<&Jieba>) -> HashSet<String> {
    let text = sentence.text(content);
    match jieba {
        Some(jieba) => jieba
            .cut(text, true)
            .into_iter()
            .map(|t| normalize_word(t.word.trim()))
            .filter(|w| {
                w.chars().any(char::is_alphanumeric)
                    && !ZH_STOP_WORDS.contains(&w.as_str())
                    && !EN_STOP_WORDS.contains(&w.as_str())
            })
            .collect(),
        None => words(text)
            .into_iter()
            .map(|w| normalize_word(w.text))
            .filter(|w| !EN_STOP_WORDS.contains(&w.as_str()))
            .collect(),
    }
}

/// Adjacency lists of the sentence graph, built through an inverted index so only sentences
/// that share a word are compared.
fn similarity_graph(bags: &[HashSet<String>]) -> Vec<Vec<(usize, f64)>> {
    let mut postings: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, bag) in bags.iter().enumerate() {
        for word in bag {
            postings.entry(word.as_str()).or_default().push(i);
        }
    }
    let mut shared: HashMap<(usize, usize), usize> = HashMap::new();
    for list in postings.values() {
        for (k, &a) in list.iter().enumerate() {
            for &b in &list[k + 1..] {
                *shared.entry((a, b)).or_insert(0) += 1;
            }
        }
    }
    let mut adjacency = vec![Vec::new(); bags.len()];
    for (&(a, b), &count) in &shared {
        let size = |i: usize| bags.get(i).map_or(1, HashSet::len).max(1) as f64;
        let norm = size(a).ln() + size(b).ln();
        // Two one-word sentences have a zero denominator; their overlap is total.
        let weight = if norm > 0.0 {
            count as f64 / norm
        } else {
            count as f64
        };
        adjacency[a].push((b, weight));
        adjacency[b].push((a, weight));
    }
    adjacency
}

/// For long texts: each sentence's words weighted by how many other sentences contain them.
fn centroid_scores(bags: &[HashSet<String>]) -> Vec<f64> {
    let mut spread: HashMap<&str, usize> = HashMap::new();
    for bag in bags {
        for word in bag {
            *spread.entry(word.as_str()).or_insert(0) += 1;
        }
    }
    bags.iter()
        .map(|bag| {
            let shared: usize = bag
                .iter()
                .map(|w| spread.get(w.as_str()).copied().unwrap_or(1) - 1)
                .sum();
            shared as f64 / (1.0 + (bag.len().max(1) as f64).ln())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENGLISH: &str = "Rust is a systems programming language. Rust guarantees memory safety \
        without a garbage collector. The weather was cold yesterday. Memory safety in Rust comes \
        from ownership and borrowing. Many companies now write services in Rust for safety and speed.";

    #[test]
    fn picks_the_central_sentences_in_text_order() {
        let summary = summarize(ENGLISH, 2, None);
        assert_eq!(summary.len(), 2);
        assert!(
            summary.iter().all(|s| !s.contains("weather")),
            "the off-topic sentence is never chosen: {summary:?}"
        );
        let positions: Vec<usize> = summary
            .iter()
            .map(|s| ENGLISH.find(s.as_str()).unwrap_or(usize::MAX))
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    }

    #[test]
    fn short_text_is_returned_whole_and_empty_text_gives_nothing() {
        assert_eq!(
            summarize("One sentence. Two sentences.", 3, None),
            ["One sentence.", "Two sentences."]
        );
        assert!(summarize("   ", 3, None).is_empty());
    }

    #[test]
    fn unrelated_sentences_give_the_lead() {
        let text = "Apples are red. Cars drive fast. Snow falls quietly. Birds sing loudly.";
        assert_eq!(
            summarize(text, 2, None),
            ["Apples are red.", "Cars drive fast."]
        );
    }

    #[test]
    fn long_texts_are_ranked_by_the_centroid_and_skip_the_off_topic() {
        let mut text = String::new();
        for i in 0..MAX_TEXTRANK_SENTENCES + 50 {
            if i == 0 {
                text.push_str("Purple elephants juggle quietly. ");
            }
            text.push_str(&format!("Rust memory safety matters for service {i}. "));
        }
        let summary = summarize(&text, 3, None);
        assert_eq!(summary.len(), 3);
        assert!(
            summary.iter().all(|s| s.contains("memory safety")),
            "{summary:?}"
        );
    }

    #[test]
    fn chinese_sentences_join_without_spaces() {
        let sentences = vec!["第一句。".to_owned(), "第二句。".to_owned()];
        assert_eq!(join(&sentences), "第一句。第二句。");
        let mixed = vec!["First.".to_owned(), "Second.".to_owned()];
        assert_eq!(join(&mixed), "First. Second.");
    }
}
