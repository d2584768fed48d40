//! Entities by pattern (both languages) and by part of speech (Chinese).
//!
//! Patterns find e-mail addresses, URLs, dates, amounts of money and numbers in Latin and
//! Chinese notation; for English, titled names ("Dr. Jane Smith") are persons and capitalised
//! names ending in an organisation word ("Acme Robotics Inc", "Stanford University") are
//! organisations. For Chinese, jieba's tags give persons (`nr`), places (`ns`) and organisations
//! (`nt`), and a run of proper nouns closed by an organisation word (公司, 大学, 银行, ...) is
//! one organisation. Earlier kinds win overlaps in that order: e-mail, URL, date, money,
//! number, then names.

use std::sync::LazyLock;

use jieba_rs::Jieba;
use regex::Regex;

use super::text::CharOffsets;
use crate::response::{Entity, EntityType};

/// Entities returned at most; the rest of a very long text is not reported.
pub const MAX_ENTITIES: usize = 1_000;

const MONTH: &str = r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)";
const AMOUNT: &str = r"\d+(?:[,，]\d{3})*(?:\.\d+)?";

/// A pattern compiled on first use; `None` only if the pattern were invalid, which the tests
/// rule out for every pattern here.
struct Pattern(LazyLock<Option<Regex>>);

macro_rules! pattern {
    ($name:ident, $build:expr) => {
        static $name: Pattern = Pattern(LazyLock::new(|| Regex::new(&$build).ok()));
    };
}

pattern!(
    EMAIL,
    String::from(r"(?i)[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}")
);
pattern!(
    URL,
    String::from(r#"(?i)(?:https?://|www\.)[^\s<>"'“”‘’（）()\[\]{}，。！？、；：]+"#)
);
pattern!(
    DATE,
    format!(
        r"(?i)\d{{4}}[-/.]\d{{1,2}}[-/.]\d{{1,2}}|\d{{1,2}}/\d{{1,2}}/\d{{2,4}}|{MONTH}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{4}})?|\d{{1,2}}(?:st|nd|rd|th)?\s+{MONTH}\.?(?:,?\s+\d{{4}})?|(?:january|february|march|april|june|july|august|september|october|november|december)\s+\d{{4}}|\d{{2,4}}年(?:\d{{1,2}}月(?:\d{{1,2}}[日号])?)?|\d{{1,2}}月\d{{1,2}}[日号]|[〇零一二三四五六七八九]{{4}}年(?:[一二三四五六七八九十]{{1,3}}月(?:[一二三四五六七八九十]{{1,3}}[日号])?)?"
    )
);
pattern!(
    MONEY,
    format!(
        r"(?i)(?:US\$|\$|€|£|¥|￥|人民币|(?:usd|eur|gbp|cny|rmb|jpy)\s?){AMOUNT}(?:\s?(?:million|billion|trillion|thousand|bn|万|亿))?|{AMOUNT}\s?(?:万|亿|千)?(?:元|美元|欧元|英镑|日元|港元|港币|块钱)|{AMOUNT}\s?(?:million|billion|thousand)?\s?(?:dollars?|euros?|pounds?|yuan)"
    )
);
pattern!(NUMBER, format!(r"[-+]?{AMOUNT}(?:万|亿)?(?:\s?%|％)?"));
pattern!(
    EN_PERSON,
    String::from(
        r"(?:Mr|Mrs|Ms|Dr|Prof|Sir|Dame)\.?\s+[A-Z][A-Za-z'-]+(?:\s+[A-Z][A-Za-z'-]+){0,2}"
    )
);
pattern!(
    EN_ORGANIZATION,
    String::from(
        r"(?:[A-Z][A-Za-z&'-]*\s+){0,3}[A-Z][A-Za-z&'-]*\s+(?:Inc|Corp|Corporation|Ltd|LLC|GmbH|Company|University|Institute|Foundation|Bank|Group|Association|Agency|Ministry|Council|Committee)\b|University\s+of\s+[A-Z][a-z]+(?:\s+[A-Z][a-z]+)?"
    )
);

/// Words that close a Chinese organisation name.
const ZH_ORGANIZATION_SUFFIXES: &[&str] = &[
    "公司",
    "有限公司",
    "集团",
    "大学",
    "学院",
    "银行",
    "医院",
    "研究院",
    "研究所",
    "委员会",
    "协会",
    "基金会",
    "出版社",
    "大酒店",
    "酒店",
    "中学",
    "小学",
    "报社",
    "电视台",
    "实验室",
];

/// Tags of words that can start or continue a Chinese organisation name.
fn is_proper_tag(tag: &str) -> bool {
    matches!(
        tag,
        "nr" | "nrt" | "nrfg" | "ns" | "nt" | "nz" | "j" | "eng"
    )
}

/// Which bytes of the text an accepted entity already covers.
struct Claims {
    taken: Vec<bool>,
    found: Vec<(usize, usize, EntityType)>,
}

impl Claims {
    fn new(len: usize) -> Self {
        Self {
            taken: vec![false; len],
            found: Vec::new(),
        }
    }

    fn claim(&mut self, start: usize, end: usize, kind: EntityType) -> bool {
        let Some(span) = self.taken.get_mut(start..end) else {
            return false;
        };
        if start >= end || span.iter().any(|t| *t) {
            return false;
        }
        span.fill(true);
        self.found.push((start, end, kind));
        true
    }
}

fn ascii_letter_before(text: &str, at: usize) -> bool {
    text.get(..at)
        .and_then(|before| before.chars().next_back())
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
}

fn alphanumeric_before(text: &str, at: usize) -> bool {
    text.get(..at)
        .and_then(|before| before.chars().next_back())
        .is_some_and(|c| c.is_ascii_alphanumeric())
}

fn alphanumeric_after(text: &str, at: usize) -> bool {
    text.get(at..)
        .and_then(|after| after.chars().next())
        .is_some_and(|c| c.is_ascii_alphanumeric())
}

fn scan(text: &str, pattern: &Pattern, kind: EntityType, claims: &mut Claims) {
    let Some(regex) = pattern.0.as_ref() else {
        return;
    };
    for m in regex.find_iter(text) {
        let (mut start, mut end) = (m.start(), m.end());
        match kind {
            EntityType::Url => {
                let trimmed = m.as_str().trim_end_matches(['.', ',', ';', ':', '!', '?']);
                end = start + trimmed.len();
            }
            EntityType::Number => {
                if ascii_letter_before(text, start) {
                    continue; // GPT-4, H2O, v2
                }
                if m.as_str().starts_with(['-', '+']) && alphanumeric_before(text, start) {
                    start += 1; // 2020-2024: a range, not a negative number
                }
                end = start + text.get(start..end).map_or(0, |s| s.trim_end().len());
            }
            EntityType::Email | EntityType::Date | EntityType::Money => {
                // Not the tail of a longer word or number ("abc2024-01-01x").
                if alphanumeric_before(text, start) && !kind_starts_with_symbol(m.as_str()) {
                    continue;
                }
                if alphanumeric_after(text, end) {
                    continue;
                }
                end = start + m.as_str().trim_end().len();
            }
            EntityType::Person | EntityType::Place | EntityType::Organization => {
                if let Some(name) = m.as_str().strip_prefix("The ") {
                    start = end - name.len();
                }
            }
        }
        claims.claim(start, end, kind);
    }
}

fn kind_starts_with_symbol(matched: &str) -> bool {
    matched.starts_with(|c: char| !c.is_alphanumeric())
}

/// Persons, places and organisations from jieba's part-of-speech tags. Organisation names
/// built from several words are claimed first, so their parts are not reported on their own.
fn chinese_names(text: &str, jieba: &Jieba, claims: &mut Claims) {
    let tags = jieba.tag(text, true);
    for (i, tag) in tags.iter().enumerate() {
        if i == 0 || !ZH_ORGANIZATION_SUFFIXES.contains(&tag.word) {
            continue;
        }
        // An organisation word closing up to four proper nouns, with at most one plain noun
        // right before it: 吉林/ns 欧亚/ns 置业/n 有限公司/n.
        let mut first = i;
        let mut proper = false;
        for (k, previous) in tags[..i].iter().enumerate().rev().take(4) {
            if is_proper_tag(previous.tag) {
                proper = true;
                first = k;
            } else if previous.tag == "n" && k + 1 == i {
                first = k;
            } else {
                break;
            }
        }
        if proper && let Some(start) = tags.get(first) {
            claims.claim(start.byte_start, tag.byte_end, EntityType::Organization);
        }
    }
    for tag in &tags {
        let kind = match tag.tag {
            "nr" | "nrfg" => EntityType::Person,
            "ns" => EntityType::Place,
            "nt" => EntityType::Organization,
            _ => continue,
        };
        // One-character "names" are almost always mis-tagged function words.
        if tag.word.chars().count() >= 2 {
            claims.claim(tag.byte_start, tag.byte_end, kind);
        }
    }
}

/// The entities of `content`, in order of appearance. `jieba` is given for Chinese text.
pub fn extract(content: &str, jieba: Option<&Jieba>) -> Vec<Entity> {
    let mut claims = Claims::new(content.len());
    scan(content, &EMAIL, EntityType::Email, &mut claims);
    scan(content, &URL, EntityType::Url, &mut claims);
    scan(content, &DATE, EntityType::Date, &mut claims);
    scan(content, &MONEY, EntityType::Money, &mut claims);
    scan(content, &NUMBER, EntityType::Number, &mut claims);
    scan(content, &EN_PERSON, EntityType::Person, &mut claims);
    scan(
        content,
        &EN_ORGANIZATION,
        EntityType::Organization,
        &mut claims,
    );
    if let Some(jieba) = jieba {
        chinese_names(content, jieba, &mut claims);
    }
    let mut found = claims.found;
    found.sort_by_key(|(start, end, _)| (*start, *end));
    let offsets = CharOffsets::new(content);
    found
        .into_iter()
        .take(MAX_ENTITIES)
        .filter_map(|(start, end, kind)| {
            Some(Entity {
                text: content.get(start..end)?.to_owned(),
                kind,
                start: offsets.char_index(start),
                end: offsets.char_index(end),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn found(text: &str) -> Vec<(String, EntityType)> {
        extract(text, None)
            .into_iter()
            .map(|e| (e.text, e.kind))
            .collect()
    }

    #[test]
    fn every_pattern_compiles() {
        for p in [
            &EMAIL,
            &URL,
            &DATE,
            &MONEY,
            &NUMBER,
            &EN_PERSON,
            &EN_ORGANIZATION,
        ] {
            assert!(p.0.is_some());
        }
    }

    #[test]
    fn english_patterns() {
        let text = "Write to jane.doe@example.com or see https://example.com/docs?x=1. \
                    On March 5, 2024 Dr. Jane Smith paid $1,250.50 to Acme Robotics Inc for 3 units (12.5% off).";
        assert_eq!(
            found(text),
            vec![
                ("jane.doe@example.com".to_owned(), EntityType::Email),
                ("https://example.com/docs?x=1".to_owned(), EntityType::Url),
                ("March 5, 2024".to_owned(), EntityType::Date),
                ("Dr. Jane Smith".to_owned(), EntityType::Person),
                ("$1,250.50".to_owned(), EntityType::Money),
                ("Acme Robotics Inc".to_owned(), EntityType::Organization),
                ("3".to_owned(), EntityType::Number),
                ("12.5%".to_owned(), EntityType::Number),
            ]
        );
    }

    #[test]
    fn model_names_and_ranges_are_not_negative_numbers() {
        let got = found("GPT-4 ran from 2019-2021 at -3 degrees.");
        assert_eq!(
            got,
            vec![
                ("2019".to_owned(), EntityType::Number),
                ("2021".to_owned(), EntityType::Number),
                ("-3".to_owned(), EntityType::Number),
            ]
        );
    }

    #[test]
    fn chinese_patterns_without_jieba() {
        let got = found("2024年3月15日，公司增资4.3亿元，注册资本由7000万元增加到5亿元，增长30%。");
        assert_eq!(
            got,
            vec![
                ("2024年3月15日".to_owned(), EntityType::Date),
                ("4.3亿元".to_owned(), EntityType::Money),
                ("7000万元".to_owned(), EntityType::Money),
                ("5亿元".to_owned(), EntityType::Money),
                ("30%".to_owned(), EntityType::Number),
            ]
        );
    }

    #[test]
    fn offsets_are_character_indices() {
        let text = "联系 a@b.cn 谢谢";
        let entities = extract(text, None);
        assert_eq!(entities.len(), 1);
        let e = &entities[0];
        let by_chars: String = text.chars().skip(e.start).take(e.end - e.start).collect();
        assert_eq!(by_chars, "a@b.cn");
        assert_eq!((e.start, e.end), (3, 9));
    }
}
