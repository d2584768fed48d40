//! Lexicon and rule sentiment.
//!
//! Each sentiment word of the lexicon contributes its valence (-4..=4), scaled by the negators
//! and degree adverbs among the three words before it in the same clause ("not good",
//! "非常满意", "不太好"). In a sentence with a contrast word ("but", "但是"), what follows the
//! contrast counts 1.5 times and what precedes it half. The sum over the text is squashed into
//! [-1, 1] with `s / sqrt(s² + 15)` (the normalisation VADER uses), and the label is neutral
//! within ±0.05.

use jieba_rs::Jieba;

use super::lexicon::SentimentLexicon;
use super::text::{normalize_word, split_sentences, words};
use crate::response::SentimentLabel;

/// Words before a sentiment word that can modify it.
const MODIFIER_WINDOW: usize = 3;
const NORMALISATION_ALPHA: f64 = 15.0;
const BEFORE_CONTRAST: f64 = 0.5;
const AFTER_CONTRAST: f64 = 1.5;

/// What the local sentiment method found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sentiment {
    pub label: SentimentLabel,
    pub score: f64,
}

/// Characters that end a clause inside a sentence (the modifier window does not cross them).
fn is_clause_break(token: &str) -> bool {
    token.chars().all(|c| {
        matches!(
            c,
            ',' | ';' | ':' | '，' | '；' | '：' | '、' | '—' | '–' | '(' | ')' | '（' | '）'
        )
    }) && !token.is_empty()
}

/// The valence sum of one sentence given as tokens (clause breaks included as tokens).
fn sentence_valence(tokens: &[String], lexicon: &SentimentLexicon) -> f64 {
    let mut hits: Vec<(usize, f64)> = Vec::new();
    let mut contrast_at: Option<usize> = None;
    let mut clause_start = 0;
    for (i, token) in tokens.iter().enumerate() {
        if is_clause_break(token) {
            clause_start = i + 1;
            continue;
        }
        if lexicon.contrasts.contains(token.as_str()) {
            contrast_at = Some(i);
            continue;
        }
        if lexicon.modifiers.contains_key(token.as_str()) {
            continue;
        }
        let Some(&valence) = lexicon.valences.get(token) else {
            continue;
        };
        let mut value = valence;
        let window_start = i.saturating_sub(MODIFIER_WINDOW).max(clause_start);
        for previous in tokens[window_start..i].iter().rev() {
            // A modifier belongs to the nearest sentiment word after it.
            if lexicon.valences.contains_key(previous)
                && !lexicon.modifiers.contains_key(previous.as_str())
            {
                break;
            }
            if let Some(factor) = lexicon.modifiers.get(previous.as_str()) {
                value *= factor;
            }
        }
        hits.push((i, value));
    }
    hits.iter()
        .map(|&(i, value)| match contrast_at {
            Some(c) if i < c => value * BEFORE_CONTRAST,
            Some(_) => value * AFTER_CONTRAST,
            None => value,
        })
        .sum()
}

fn squash(total: f64) -> Sentiment {
    let score = if total.is_finite() {
        (total / (total * total + NORMALISATION_ALPHA).sqrt()).clamp(-1.0, 1.0)
    } else {
        0.0
    };
    Sentiment {
        label: SentimentLabel::of_score(score),
        score,
    }
}

/// Sentiment of English text.
pub fn english(text: &str, lexicon: &SentimentLexicon) -> Sentiment {
    let total = split_sentences(text)
        .iter()
        .map(|sentence| {
            let body = sentence.text(text);
            let mut tokens = Vec::new();
            let mut last = 0;
            for word in words(body) {
                // Punctuation between two words may end a clause.
                if let Some(gap) = body.get(last..word.start)
                    && gap.chars().any(|c| is_clause_break(&c.to_string()))
                {
                    tokens.push(",".to_owned());
                }
                tokens.push(normalize_word(word.text));
                last = word.start + word.text.len();
            }
            sentence_valence(&tokens, lexicon)
        })
        .sum();
    squash(total)
}

/// Sentiment of Chinese text, segmented by jieba.
pub fn chinese(text: &str, jieba: &Jieba, lexicon: &SentimentLexicon) -> Sentiment {
    let total = split_sentences(text)
        .iter()
        .map(|sentence| {
            let tokens: Vec<String> = jieba
                .cut(sentence.text(text), true)
                .into_iter()
                .map(|t| normalize_word(t.word))
                .filter(|t| !t.trim().is_empty())
                .collect();
            sentence_valence(&tokens, lexicon)
        })
        .sum();
    squash(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::LazyLock;

    static EN: LazyLock<SentimentLexicon> = LazyLock::new(SentimentLexicon::english);
    static ZH: LazyLock<SentimentLexicon> = LazyLock::new(SentimentLexicon::chinese);
    static JIEBA: LazyLock<Jieba> = LazyLock::new(Jieba::new);

    fn en(text: &str) -> Sentiment {
        english(text, &EN)
    }

    fn zh(text: &str) -> Sentiment {
        chinese(text, &JIEBA, &ZH)
    }

    #[test]
    fn english_labels_clear_cases() {
        assert_eq!(
            en("The food was excellent and the staff were friendly.").label,
            SentimentLabel::Positive
        );
        assert_eq!(
            en("The service was terrible and the room was dirty.").label,
            SentimentLabel::Negative
        );
        let neutral = en("The meeting is at ten in room four.");
        assert_eq!(neutral.label, SentimentLabel::Neutral);
        assert_eq!(neutral.score, 0.0);
    }

    #[test]
    fn english_negation_flips_and_intensifiers_scale() {
        let good = en("The phone is good.").score;
        let not_good = en("The phone is not good.").score;
        let very_good = en("The phone is very good.").score;
        assert!(good > 0.0 && not_good < 0.0, "{good} {not_good}");
        assert!(not_good.abs() < good, "negation weakens as well as flips");
        assert!(very_good > good);
        assert!(en("It isn't bad at all.").score > 0.0);
    }

    #[test]
    fn negation_does_not_cross_a_clause_break() {
        let s = en("No, the camera is great.").score;
        assert!(s > 0.0, "{s}");
    }

    #[test]
    fn english_but_gives_the_second_clause_more_weight() {
        let s = en("The screen is good but the battery is awful.");
        assert_eq!(s.label, SentimentLabel::Negative, "{s:?}");
    }

    #[test]
    fn chinese_labels_reviews() {
        assert_eq!(
            zh("这款手机的屏幕非常出色，电池续航令人满意，值得推荐。").label,
            SentimentLabel::Positive
        );
        assert_eq!(
            zh("这家餐厅让我非常失望，服务员态度冷淡，菜也很难吃。").label,
            SentimentLabel::Negative
        );
        assert_eq!(zh("会议在下午三点开始。").label, SentimentLabel::Neutral);
    }

    #[test]
    fn chinese_negation_flips_and_degree_adverbs_scale() {
        let satisfied = zh("我对结果满意。").score;
        let not_satisfied = zh("我对结果不满意。").score;
        let very_satisfied = zh("我对结果非常满意。").score;
        assert!(satisfied > 0.0 && not_satisfied < 0.0);
        assert!(very_satisfied > satisfied);
        assert!(
            zh("手机没有明显发热。").score > 0.0,
            "no overheating is good"
        );
        assert!(zh("效果不太好。").score < 0.0);
    }

    #[test]
    fn chinese_contrast_weighs_the_second_clause() {
        assert_eq!(
            zh("环境不错，但是卫生很差。").label,
            SentimentLabel::Negative
        );
    }

    #[test]
    fn scores_stay_in_range_for_long_text() {
        let long = "Great, wonderful, excellent! ".repeat(500);
        let s = en(&long).score;
        assert!(s > 0.99 && s <= 1.0, "{s}");
        assert_eq!(en("").score, 0.0);
    }
}
