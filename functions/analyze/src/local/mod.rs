//! The local methods: no network, deterministic, for Chinese and English.
//!
//! | file            | what                                                              |
//! |-----------------|-------------------------------------------------------------------|
//! | `text.rs`       | language detection, sentence splitting, words, character offsets  |
//! | `lexicon.rs`    | sentiment lexicons, modifiers, stop words                         |
//! | `keywords.rs`   | TF-IDF and TextRank keywords                                      |
//! | `sentiment.rs`  | lexicon and rule sentiment                                        |
//! | `summary.rs`    | extractive TextRank summary                                       |
//! | `entities.rs`   | entities by pattern and by part of speech                         |
//! | `rank.rs`       | weighted PageRank                                                 |
//!
//! Heavy resources load on first use, per language: an English-only instance never pays for
//! jieba's dictionary, and a Chinese request that only asks for sentiment never builds the IDF
//! table. Each loads once per instance ([`OnceLock`]), so every later request finds it ready.
//! Measured figures are in the README (`examples/coldstart.rs` prints them).

mod entities;
mod keywords;
mod lexicon;
mod rank;
mod sentiment;
mod summary;
mod text;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use jieba_rs::{Jieba, KeywordExtractConfig, TextRank, TfIdf};

pub use entities::MAX_ENTITIES;
pub use text::{CharOffsets, detect_language};

use crate::request::{KeywordAlgorithm, Language};
use crate::response::{EntitiesResult, KeywordsResult, Method, SentimentResult, SummaryResult};
use lexicon::SentimentLexicon;

/// A resource of the local methods, for [`LocalAnalyzer::load`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// The English sentiment lexicon (about 7 200 words).
    EnglishLexicon,
    /// The Chinese sentiment lexicon.
    ChineseLexicon,
    /// jieba's segmentation dictionary (about 350 000 words) and HMM.
    Jieba,
    /// jieba's IDF table for TF-IDF keywords.
    ChineseIdf,
    /// The compiled entity patterns.
    Patterns,
}

impl Resource {
    pub const ALL: [Resource; 5] = [
        Resource::EnglishLexicon,
        Resource::Patterns,
        Resource::ChineseLexicon,
        Resource::Jieba,
        Resource::ChineseIdf,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Resource::EnglishLexicon => "english sentiment lexicon",
            Resource::ChineseLexicon => "chinese sentiment lexicon",
            Resource::Jieba => "jieba dictionary",
            Resource::ChineseIdf => "jieba IDF table",
            Resource::Patterns => "entity patterns",
        }
    }
}

/// The local analyser of one instance, its resources loaded on first use.
#[derive(Default)]
pub struct LocalAnalyzer {
    english_lexicon: OnceLock<SentimentLexicon>,
    chinese_lexicon: OnceLock<SentimentLexicon>,
    jieba: OnceLock<Jieba>,
    tfidf: OnceLock<TfIdf>,
    textrank: OnceLock<TextRank>,
}

impl std::fmt::Debug for LocalAnalyzer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalAnalyzer")
            .field("jieba_loaded", &self.jieba.get().is_some())
            .field("idf_loaded", &self.tfidf.get().is_some())
            .finish_non_exhaustive()
    }
}

impl LocalAnalyzer {
    pub fn new() -> Self {
        Self::default()
    }

    fn english_lexicon(&self) -> &SentimentLexicon {
        self.english_lexicon.get_or_init(SentimentLexicon::english)
    }

    fn chinese_lexicon(&self) -> &SentimentLexicon {
        self.chinese_lexicon.get_or_init(SentimentLexicon::chinese)
    }

    fn jieba(&self) -> &Jieba {
        self.jieba.get_or_init(Jieba::new)
    }

    /// jieba-rs's TF-IDF with the reference's segmentation: HMM on for unknown words (Python's
    /// `extract_tags` cuts with `HMM=True`; jieba-rs defaults to off).
    fn tfidf(&self) -> &TfIdf {
        self.tfidf.get_or_init(|| {
            let mut tfidf = TfIdf::default();
            *tfidf.config_mut() = KeywordExtractConfig::builder().use_hmm(true).build();
            tfidf
        })
    }

    fn textrank(&self) -> &TextRank {
        self.textrank
            .get_or_init(|| TextRank::new(5, KeywordExtractConfig::builder().use_hmm(true).build()))
    }

    /// Loads `resource` now if it is not loaded yet, returning how long that took (zero when
    /// it was already there). For the benchmark and for callers that want to warm up.
    pub fn load(&self, resource: Resource) -> Duration {
        let started = Instant::now();
        match resource {
            Resource::EnglishLexicon => {
                self.english_lexicon();
            }
            Resource::ChineseLexicon => {
                self.chinese_lexicon();
            }
            Resource::Jieba => {
                self.jieba();
            }
            Resource::ChineseIdf => {
                self.tfidf();
            }
            Resource::Patterns => {
                // Matching one text compiles every pattern.
                entities::extract("a@b.co https://x.io 2024-01-01 $1 1", None);
            }
        }
        started.elapsed()
    }

    /// Which resources are loaded.
    pub fn loaded(&self) -> Vec<Resource> {
        let mut loaded = Vec::new();
        if self.english_lexicon.get().is_some() {
            loaded.push(Resource::EnglishLexicon);
        }
        if self.chinese_lexicon.get().is_some() {
            loaded.push(Resource::ChineseLexicon);
        }
        if self.jieba.get().is_some() {
            loaded.push(Resource::Jieba);
        }
        if self.tfidf.get().is_some() {
            loaded.push(Resource::ChineseIdf);
        }
        loaded
    }

    pub fn sentiment(&self, content: &str, language: Language) -> SentimentResult {
        let found = match language {
            Language::Zh => sentiment::chinese(content, self.jieba(), self.chinese_lexicon()),
            Language::En => sentiment::english(content, self.english_lexicon()),
        };
        SentimentResult {
            method: Method::Local,
            label: found.label,
            score: found.score,
            fallback_reason: None,
        }
    }

    pub fn keywords(
        &self,
        content: &str,
        language: Language,
        top_k: usize,
        algorithm: KeywordAlgorithm,
    ) -> KeywordsResult {
        let items = match (language, algorithm) {
            (Language::Zh, KeywordAlgorithm::Tfidf) => {
                // The IDF table first: on a cold instance the concurrent tasks are loading
                // jieba meanwhile, so the two loads overlap where there is a second core.
                let tfidf = self.tfidf();
                keywords::chinese_tfidf(self.jieba(), tfidf, content, top_k)
            }
            (Language::Zh, KeywordAlgorithm::Textrank) => {
                keywords::chinese_textrank(self.jieba(), self.textrank(), content, top_k)
            }
            (Language::En, KeywordAlgorithm::Tfidf) => keywords::english_tfidf(content, top_k),
            (Language::En, KeywordAlgorithm::Textrank) => {
                keywords::english_textrank(content, top_k)
            }
        };
        KeywordsResult {
            method: Method::Local,
            algorithm: Some(algorithm),
            items,
            fallback_reason: None,
        }
    }

    pub fn summary(&self, content: &str, language: Language, sentences: usize) -> SummaryResult {
        let jieba = (language == Language::Zh).then(|| self.jieba());
        let chosen = summary::summarize(content, sentences, jieba);
        SummaryResult {
            method: Method::Local,
            text: summary::join(&chosen),
            sentences: chosen,
            fallback_reason: None,
        }
    }

    pub fn entities(&self, content: &str, language: Language) -> EntitiesResult {
        let jieba = (language == Language::Zh).then(|| self.jieba());
        EntitiesResult {
            method: Method::Local,
            items: entities::extract(content, jieba),
            fallback_reason: None,
        }
    }
}

/// Joins summary sentences the way local summaries are joined (for LLM summaries too).
pub fn join_sentences(sentences: &[String]) -> String {
    summary::join(sentences)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::response::{EntityType, SentimentLabel};
    use std::sync::LazyLock;

    static LOCAL: LazyLock<LocalAnalyzer> = LazyLock::new(LocalAnalyzer::new);

    const ZH_TEXT: &str = "今天纽约的天气真好啊，京华大酒店的张尧经理吃了一只北京烤鸭。后天纽约的天气不好，\
        昨天纽约的天气也不好，北京烤鸭真好吃";

    #[test]
    fn resources_load_lazily_per_language() {
        let local = LocalAnalyzer::new();
        local.sentiment("What a lovely day.", Language::En);
        assert_eq!(local.loaded(), vec![Resource::EnglishLexicon]);
        local.keywords("今天天气很好", Language::Zh, 3, KeywordAlgorithm::Tfidf);
        assert_eq!(
            local.loaded(),
            vec![
                Resource::EnglishLexicon,
                Resource::Jieba,
                Resource::ChineseIdf
            ]
        );
    }

    #[test]
    fn chinese_tfidf_matches_the_jieba_documentation_example() {
        let result = LOCAL.keywords(ZH_TEXT, Language::Zh, 3, KeywordAlgorithm::Tfidf);
        let words: Vec<&str> = result.items.iter().map(|k| k.word.as_str()).collect();
        assert_eq!(words, ["北京烤鸭", "纽约", "天气"]);
        assert_eq!(result.items[1].pos.as_deref(), Some("ns"));
        assert_eq!(result.algorithm, Some(KeywordAlgorithm::Tfidf));
    }

    #[test]
    fn chinese_textrank_keeps_nouns_and_verbs() {
        let text = "此外，公司拟对全资子公司吉林欧亚置业有限公司增资4.3亿元，增资后，吉林欧亚置业注册资本由7000万元增加到5亿元。\
            吉林欧亚置业主要经营范围为房地产开发及百货零售等业务。目前在建吉林欧亚城市商业综合体项目。";
        let result = LOCAL.keywords(text, Language::Zh, 5, KeywordAlgorithm::Textrank);
        let words: Vec<&str> = result.items.iter().map(|k| k.word.as_str()).collect();
        assert!(words.contains(&"吉林"), "{words:?}");
        assert!(words.contains(&"欧亚"), "{words:?}");
        assert!(
            result
                .items
                .iter()
                .all(|k| ZH_TEXTRANK_POS_FOR_TEST.contains(&k.pos.as_deref().unwrap_or("")))
        );
        assert_eq!(result.items[0].weight, 1.0);
    }

    const ZH_TEXTRANK_POS_FOR_TEST: [&str; 4] = ["ns", "n", "vn", "v"];

    #[test]
    fn chinese_summary_picks_the_sentences_about_the_topic() {
        let text = "大熊猫是中国特有的珍稀动物。大熊猫主要生活在四川的山区竹林中。今天的午饭很好吃。\
            保护大熊猫的栖息地对大熊猫的繁殖非常重要。";
        let result = LOCAL.summary(text, Language::Zh, 2);
        assert_eq!(result.sentences.len(), 2);
        assert!(!result.text.contains("午饭"), "{:?}", result.sentences);
        assert!(!result.text.contains(' '));
    }

    #[test]
    fn chinese_entities_come_from_tags_and_patterns() {
        let text = "张伟在北京大学工作，2024年3月15日去了上海，花了1200元。吉林欧亚置业有限公司增资4.3亿元。";
        let got: Vec<(String, EntityType)> = LOCAL
            .entities(text, Language::Zh)
            .items
            .into_iter()
            .map(|e| (e.text, e.kind))
            .collect();
        for expected in [
            ("张伟", EntityType::Person),
            ("北京大学", EntityType::Organization),
            ("2024年3月15日", EntityType::Date),
            ("上海", EntityType::Place),
            ("1200元", EntityType::Money),
            ("吉林欧亚置业有限公司", EntityType::Organization),
            ("4.3亿元", EntityType::Money),
        ] {
            assert!(
                got.contains(&(expected.0.to_owned(), expected.1)),
                "{expected:?} missing from {got:?}"
            );
        }
    }

    #[test]
    fn chinese_sentiment_through_the_analyzer() {
        let result = LOCAL.sentiment("这部电影非常精彩，演员的表演也很出色。", Language::Zh);
        assert_eq!(result.label, SentimentLabel::Positive);
        assert_eq!(result.method, Method::Local);
    }

    #[test]
    fn english_summary_and_entities_through_the_analyzer() {
        let summary = LOCAL.summary("One. Two. Three. Four.", Language::En, 2);
        assert_eq!(summary.sentences.len(), 2);
        assert_eq!(summary.text, "One. Two.");
        let entities = LOCAL.entities("Mail ops@example.org by 2024-05-01.", Language::En);
        assert_eq!(entities.items.len(), 2);
    }

    /// Runs every local method on `text` in both languages and checks the invariants that hold
    /// for any input.
    fn check_all_methods(text: &str) {
        let chars = text.chars().count();
        for language in [Language::En, Language::Zh] {
            let sentiment = LOCAL.sentiment(text, language);
            assert!((-1.0..=1.0).contains(&sentiment.score));
            assert_eq!(sentiment.label, SentimentLabel::of_score(sentiment.score));
            for algorithm in [KeywordAlgorithm::Tfidf, KeywordAlgorithm::Textrank] {
                let keywords = LOCAL.keywords(text, language, 7, algorithm);
                assert!(keywords.items.len() <= 7);
                assert!(
                    keywords
                        .items
                        .iter()
                        .all(|k| k.weight.is_finite() && !k.word.is_empty())
                );
            }
            let summary = LOCAL.summary(text, language, 2);
            assert!(summary.sentences.len() <= 2);
            assert!(summary.sentences.iter().all(|s| text.contains(s.as_str())));
            for entity in LOCAL.entities(text, language).items {
                assert!(entity.start < entity.end && entity.end <= chars);
                let by_chars: String = text
                    .chars()
                    .skip(entity.start)
                    .take(entity.end - entity.start)
                    .collect();
                assert_eq!(by_chars, entity.text);
            }
        }
    }

    #[test]
    fn empty_and_whitespace_inputs_give_empty_results() {
        for text in ["", " ", "\n\r\n\t", "。。。", "!!!"] {
            check_all_methods(text);
            assert!(
                LOCAL
                    .keywords(text, Language::Zh, 5, KeywordAlgorithm::Tfidf)
                    .items
                    .is_empty()
            );
        }
    }

    #[test]
    fn the_longest_accepted_content_is_analysed_in_both_languages() {
        let zh = "大熊猫生活在四川的竹林中，2024年保护经费为3.5亿元。联系 panda@example.org！\n"
            .repeat(1_000);
        let zh: String = zh.chars().take(crate::request::MAX_CONTENT_CHARS).collect();
        check_all_methods(&zh);
        let en = "Dr. Ada Lovelace wrote notes on March 5, 1843 about the engine, costing $1,200. "
            .repeat(700);
        let en: String = en.chars().take(crate::request::MAX_CONTENT_CHARS).collect();
        check_all_methods(&en);
        assert_eq!(
            LOCAL.entities(&en, Language::En).items.len(),
            MAX_ENTITIES,
            "entities are capped"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn mixed_text() -> impl Strategy<Value = String> {
            let pieces = prop_oneof![
                "[\\u{4e00}-\\u{9fa5}]{1,6}",
                "[A-Za-z]{1,8}",
                "[0-9.,%$¥元年月日-]{1,6}",
                "[ \n\r\t。！？，、.!?,;:'’\"“”()（）@/]{1,3}",
                any::<char>().prop_map(|c| c.to_string()),
            ];
            proptest::collection::vec(pieces, 0..60).prop_map(|p| p.concat())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(96))]

            #[test]
            fn arbitrary_unicode_never_panics(text in any::<String>()) {
                check_all_methods(&text);
            }

            #[test]
            fn mixed_chinese_and_latin_text_never_panics(text in mixed_text()) {
                check_all_methods(&text);
            }
        }
    }
}
