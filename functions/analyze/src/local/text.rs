//! Text plumbing shared by the local methods: language detection, sentence splitting, English
//! words and byte-to-character offsets. Everything here works on any UTF-8 input and never
//! slices inside a character.

use crate::request::Language;

/// Whether `c` is a CJK unified ideograph (the blocks jieba segments as Chinese).
pub fn is_han(c: char) -> bool {
    matches!(c,
        '\u{4E00}'..='\u{9FFF}'
        | '\u{3400}'..='\u{4DBF}'
        | '\u{20000}'..='\u{2A6DF}'
        | '\u{2A700}'..='\u{2EBEF}'
        | '\u{F900}'..='\u{FAFF}')
}

/// `zh` when Han characters make up at least a fifth of the letters, else `en`.
///
/// A fifth, not a half: Chinese technical prose is full of Latin product names and acronyms
/// (`AWS Lambda 的冷启动`), while English text with a few Chinese words is rare. Text without
/// letters at all (numbers, emoji) is `en`, whose methods degrade gracefully on it.
pub fn detect_language(text: &str) -> Language {
    let (han, letters) = text.chars().fold((0usize, 0usize), |(han, letters), c| {
        if is_han(c) {
            (han + 1, letters + 1)
        } else if c.is_alphabetic() {
            (han, letters + 1)
        } else {
            (han, letters)
        }
    });
    if han > 0 && han * 5 >= letters {
        Language::Zh
    } else {
        Language::En
    }
}

/// A sentence of the text: byte range `start..end`, trimmed of surrounding whitespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sentence {
    pub start: usize,
    pub end: usize,
}

impl Sentence {
    pub fn text<'a>(&self, content: &'a str) -> &'a str {
        content.get(self.start..self.end).unwrap_or_default()
    }
}

/// Ends a sentence wherever it appears.
fn is_strong_terminator(c: char) -> bool {
    matches!(c, '。' | '！' | '？' | '!' | '?' | '…' | '｡' | '︒')
}

/// Belongs to the sentence it follows (closing quotes and brackets after the terminator).
fn is_closer(c: char) -> bool {
    matches!(
        c,
        '"' | '\'' | '”' | '’' | '」' | '』' | '）' | ')' | '】' | '》' | '〉' | ']' | '»'
    )
}

/// Words after which a period does not end a sentence (compared lowercase, without the dot).
const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "eg", "ie",
    "inc", "ltd", "co", "corp", "no", "fig", "approx", "dept", "est", "gen", "gov", "jan", "feb",
    "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "u.s", "u.k", "a.m",
    "p.m", "mt", "ave", "rd", "vol", "ed", "cf",
];

/// Whether the period at byte `dot` of `text` ends a sentence: it must be followed by
/// whitespace, a closer or the end, and must not close an abbreviation or an initial.
fn period_ends_sentence(text: &str, dot: usize) -> bool {
    let after = text.get(dot + 1..).unwrap_or_default();
    let next = after.chars().find(|c| *c != '.');
    if let Some(c) = next
        && !(c.is_whitespace() || is_closer(c))
    {
        return false; // 3.14, example.com, a.m.
    }
    let before = text.get(..dot).unwrap_or_default();
    let word: String = before
        .chars()
        .rev()
        .take_while(|c| c.is_alphanumeric() || *c == '.')
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let lower = word.to_lowercase();
    if ABBREVIATIONS.contains(&lower.as_str()) {
        return false;
    }
    // A single capital letter is an initial ("J. R. R. Tolkien").
    let mut chars = word.chars();
    !matches!((chars.next(), chars.next()), (Some(c), None) if c.is_uppercase())
}

/// Splits `text` into sentences at Chinese (。！？) and Latin (.!?) terminators, ellipses and
/// line breaks. Closing quotes and brackets stay with their sentence; runs of terminators
/// (`?!`, `……`) end one sentence; periods of abbreviations, initials and decimals do not.
pub fn split_sentences(text: &str) -> Vec<Sentence> {
    let mut sentences = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let ends = if c == '.' {
            period_ends_sentence(text, i)
        } else {
            c == '\n' || c == '\r' || is_strong_terminator(c)
        };
        if !ends {
            continue;
        }
        let mut end = i + c.len_utf8();
        while let Some(&(j, next)) = chars.peek() {
            let absorb = is_strong_terminator(next)
                || (next == '.' && c != '\n')
                || (is_closer(next) && c != '\n' && c != '\r');
            if !absorb {
                break;
            }
            end = j + next.len_utf8();
            chars.next();
        }
        push_trimmed(text, start, end, &mut sentences);
        start = end;
    }
    push_trimmed(text, start, text.len(), &mut sentences);
    sentences
}

fn push_trimmed(text: &str, start: usize, end: usize, out: &mut Vec<Sentence>) {
    let Some(slice) = text.get(start..end) else {
        return;
    };
    let leading = slice.len() - slice.trim_start().len();
    let trimmed = slice.trim();
    if trimmed.is_empty() {
        return;
    }
    let s = start + leading;
    out.push(Sentence {
        start: s,
        end: s + trimmed.len(),
    });
}

/// One word of Latin-script text: byte offset and the word as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Word<'a> {
    pub start: usize,
    pub text: &'a str,
}

/// Runs of letters and digits, keeping an apostrophe or hyphen between two of them
/// (`don't`, `state-of-the-art`, `GPT-4`).
pub fn words(text: &str) -> Vec<Word<'_>> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let joiner = matches!(c, '\'' | '’' | '-');
        if c.is_alphanumeric() && !is_han(c) {
            if start.is_none() {
                start = Some(i);
            }
        } else if joiner
            && start.is_some()
            && chars
                .peek()
                .is_some_and(|(_, n)| n.is_alphanumeric() && !is_han(*n))
        {
            // Part of the word.
        } else if let Some(s) = start.take()
            && let Some(word) = text.get(s..i)
        {
            out.push(Word {
                start: s,
                text: word,
            });
        }
    }
    if let Some(s) = start
        && let Some(word) = text.get(s..)
    {
        out.push(Word {
            start: s,
            text: word,
        });
    }
    out
}

/// Lowercase form used for every lexicon and stop-word lookup (typographic apostrophes folded).
pub fn normalize_word(word: &str) -> String {
    word.to_lowercase().replace('’', "'")
}

/// Converts byte offsets of one text to character offsets.
pub struct CharOffsets {
    /// Byte offset of every character, ascending.
    starts: Vec<usize>,
    len: usize,
}

impl CharOffsets {
    pub fn new(text: &str) -> Self {
        Self {
            starts: text.char_indices().map(|(i, _)| i).collect(),
            len: text.len(),
        }
    }

    /// The index of the character at byte `byte` (the number of characters before it); a byte
    /// past the end maps to the character count.
    pub fn char_index(&self, byte: usize) -> usize {
        if byte >= self.len {
            return self.starts.len();
        }
        self.starts.partition_point(|&s| s < byte)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn texts(text: &str) -> Vec<&str> {
        split_sentences(text).iter().map(|s| s.text(text)).collect()
    }

    #[test]
    fn detects_chinese_even_with_latin_product_names() {
        assert_eq!(
            detect_language("AWS Lambda 的冷启动延迟很重要"),
            Language::Zh
        );
        assert_eq!(detect_language("今天天气很好"), Language::Zh);
        assert_eq!(
            detect_language("The word 你好 means hello in Chinese, as every guide says."),
            Language::En
        );
        assert_eq!(detect_language("12345 !!!"), Language::En);
        assert_eq!(detect_language(""), Language::En);
    }

    #[test]
    fn splits_chinese_sentences_and_keeps_closing_quotes() {
        assert_eq!(
            texts("他说：“今天真好！”我们出发了。真的吗？？走吧……好"),
            [
                "他说：“今天真好！”",
                "我们出发了。",
                "真的吗？？",
                "走吧……",
                "好"
            ]
        );
    }

    #[test]
    fn splits_latin_sentences_but_not_at_abbreviations_initials_or_decimals() {
        assert_eq!(
            texts(
                "Dr. Smith paid $3.50 at 9 a.m. on Main St. today. J. R. R. Tolkien wrote it! Really? Yes."
            ),
            [
                "Dr. Smith paid $3.50 at 9 a.m. on Main St. today.",
                "J. R. R. Tolkien wrote it!",
                "Really?",
                "Yes."
            ]
        );
        assert_eq!(
            texts("See example.com for more... Then stop."),
            ["See example.com for more...", "Then stop."]
        );
    }

    #[test]
    fn line_breaks_end_sentences_without_punctuation() {
        assert_eq!(
            texts("Heading\r\n\r\n  First line\nSecond line."),
            ["Heading", "First line", "Second line."]
        );
        assert!(split_sentences("   \n\n ").is_empty());
    }

    #[test]
    fn words_keep_inner_apostrophes_and_hyphens() {
        let got: Vec<&str> =
            words("Don't use GPT-4's state-of-the-art—really, 'quoted' -x 东西 ok")
                .iter()
                .map(|w| w.text)
                .collect();
        assert_eq!(
            got,
            [
                "Don't",
                "use",
                "GPT-4's",
                "state-of-the-art",
                "really",
                "quoted",
                "x",
                "ok"
            ]
        );
    }

    #[test]
    fn char_offsets_count_scalar_values() {
        let text = "a好b😀c";
        let offsets = CharOffsets::new(text);
        assert_eq!(offsets.char_index(0), 0);
        assert_eq!(offsets.char_index(1), 1);
        assert_eq!(offsets.char_index(4), 2);
        assert_eq!(offsets.char_index(5), 3);
        assert_eq!(offsets.char_index(9), 4);
        assert_eq!(offsets.char_index(text.len()), 5);
    }
}
