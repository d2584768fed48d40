//! Splitting a long text into chunks of at most `max_chars` characters at the best boundary
//! available.
//!
//! Boundaries, best first:
//! 1. **paragraph**: right after a blank line (a line break, then a line of nothing but
//!    whitespace ending in a line break);
//! 2. **sentence**: after a sentence end and any closing quotes or brackets, plus the whitespace
//!    that follows. Chinese `。！？` end a sentence by themselves; Latin `.!?` only when
//!    whitespace follows, so `3.14` and `e.g.x` are not split;
//! 3. **word**: where whitespace ends and text resumes (Latin text without sentence ends);
//! 4. **character**: anywhere between two characters, as a last resort.
//!
//! Each chunk is the longest prefix of the rest that fits and ends at the best kind of boundary
//! found within that window. Chunks are slices of the input: concatenated they give the input
//! back exactly, and no chunk ever starts or ends inside a UTF-8 character. Sizes count
//! characters (Unicode scalar values), not bytes.

/// Kinds of boundary, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Boundary {
    Character = 0,
    Word = 1,
    Sentence = 2,
    Paragraph = 3,
}

const SENTENCE_ENDS_CJK: &[char] = &['。', '！', '？'];
const SENTENCE_ENDS_LATIN: &[char] = &['.', '!', '?'];
const CLOSERS: &[char] = &[
    '"', '\'', ')', ']', '}', '”', '’', '」', '』', '）', '】', '》', '〉',
];

/// The kind of boundary at each character position: `levels[i]` describes the cut before the
/// `i`-th character (only `1..chars.len()` are cuts; the ends of the text are not).
fn boundary_levels(chars: &[char]) -> Vec<Boundary> {
    let mut levels = vec![Boundary::Character; chars.len() + 1];
    for i in 1..chars.len() {
        if chars[i - 1].is_whitespace() && !chars[i].is_whitespace() {
            levels[i] = Boundary::Word;
        }
        if ends_sentence(chars, i) {
            levels[i] = Boundary::Sentence;
        }
        if ends_blank_line(chars, i) {
            levels[i] = Boundary::Paragraph;
        }
    }
    levels
}

/// Whether the cut before character `i` comes right after a blank line: a line break, a line
/// of nothing but whitespace, and the line break that ends it.
fn ends_blank_line(chars: &[char], i: usize) -> bool {
    chars[i - 1] == '\n'
        && chars[..i - 1]
            .iter()
            .rev()
            .find(|c| !c.is_whitespace() || **c == '\n')
            .is_some_and(|c| *c == '\n')
}

/// Whether the cut before character `i` follows a finished sentence: the text before it is a
/// sentence end, optional closers, optional whitespace, and the character at `i` starts new
/// text, so closing quotes and the whitespace stay with the sentence they follow.
fn ends_sentence(chars: &[char], i: usize) -> bool {
    if chars[i].is_whitespace() || CLOSERS.contains(&chars[i]) {
        return false;
    }
    let mut j = i;
    let mut saw_space = false;
    while j > 0 && chars[j - 1].is_whitespace() {
        saw_space = true;
        j -= 1;
    }
    while j > 0 && CLOSERS.contains(&chars[j - 1]) {
        j -= 1;
    }
    if j == 0 {
        return false;
    }
    let end = chars[j - 1];
    SENTENCE_ENDS_CJK.contains(&end) || (saw_space && SENTENCE_ENDS_LATIN.contains(&end))
}

/// Splits `text` into chunks of at most `max_chars` characters (at least 1), each ending at the
/// best boundary within its reach. An empty text gives no chunks.
pub fn split(text: &str, max_chars: usize) -> Vec<&str> {
    let max_chars = max_chars.max(1);
    let offsets: Vec<usize> = text
        .char_indices()
        .map(|(offset, _)| offset)
        .chain(std::iter::once(text.len()))
        .collect();
    let chars: Vec<char> = text.chars().collect();
    let n = chars.len();
    if n == 0 {
        return Vec::new();
    }
    let levels = boundary_levels(&chars);
    // last[k][i]: the largest cut position <= i whose level is at least k (0 when none).
    let mut last = [
        vec![0usize; n + 1],
        vec![0usize; n + 1],
        vec![0usize; n + 1],
    ];
    for i in 1..=n {
        for (k, table) in last.iter_mut().enumerate() {
            let level = k + 1;
            table[i] = if i < n && levels[i] as usize >= level {
                i
            } else {
                table[i - 1]
            };
        }
    }
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < n {
        let window_end = start + max_chars;
        if window_end >= n {
            chunks.push(&text[offsets[start]..]);
            break;
        }
        let cut = [Boundary::Paragraph, Boundary::Sentence, Boundary::Word]
            .iter()
            .map(|b| last[*b as usize - 1][window_end])
            .find(|&p| p > start)
            .unwrap_or(window_end);
        chunks.push(&text[offsets[start]..offsets[cut]]);
        start = cut;
    }
    chunks
}

/// The kind of every cut of `text`: element `i` is the cut before its `i`-th character, for
/// `i` in `0..=chars` (the two ends of the text count as `Character`).
pub fn boundaries(text: &str) -> Vec<Boundary> {
    let chars: Vec<char> = text.chars().collect();
    let mut levels = boundary_levels(&chars);
    if let Some(end) = levels.last_mut() {
        *end = Boundary::Character;
    }
    levels
}

/// The kind of boundary a cut before character `position` of `text` would be.
pub fn boundary_at(text: &str, position: usize) -> Boundary {
    boundaries(text)
        .get(position)
        .copied()
        .unwrap_or(Boundary::Character)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keeps_short_text_whole_and_gives_nothing_for_empty_text() {
        assert_eq!(split("Hello.", 100), ["Hello."]);
        assert!(split("", 10).is_empty());
        assert_eq!(
            split("abc", 0),
            ["a", "b", "c"],
            "a zero size still makes progress"
        );
    }

    #[test]
    fn prefers_paragraphs_then_sentences_then_words_then_characters() {
        let text = "First one. Second one.\n\nNext paragraph here.";
        assert_eq!(
            split(text, 30),
            ["First one. Second one.\n\n", "Next paragraph here."]
        );
        assert_eq!(
            split("One two. Three four five six.", 20),
            ["One two. ", "Three four five six."]
        );
        assert_eq!(
            split("alpha beta gamma delta", 12),
            ["alpha beta ", "gamma delta"]
        );
        assert_eq!(split("abcdefghij", 4), ["abcd", "efgh", "ij"]);
    }

    #[test]
    fn splits_chinese_after_full_stops_and_closing_quotes() {
        let text = "今天天气很好。我们去公园吧！“你来吗？”他问。好的。";
        let chunks = split(text, 12);
        assert_eq!(
            chunks,
            ["今天天气很好。", "我们去公园吧！", "“你来吗？”他问。好的。"]
        );
        assert_eq!(boundary_at(text, 7), Boundary::Sentence);
        assert_eq!(boundary_at("他说“好。”然后", 6), Boundary::Sentence);
    }

    #[test]
    fn latin_stops_need_whitespace_after_them() {
        assert_eq!(boundary_at("Pi is 3.14 today", 8), Boundary::Character);
        assert_eq!(boundary_at("Done. Next", 6), Boundary::Sentence);
        assert_eq!(
            boundary_at("Done. Next", 5),
            Boundary::Character,
            "inside the space run"
        );
        assert_eq!(boundary_at("He said \"go.\" Then", 14), Boundary::Sentence);
    }

    #[test]
    fn paragraph_boundary_is_after_the_blank_line() {
        let text = "a b\n\n\nc d";
        assert_eq!(boundary_at(text, 5), Boundary::Paragraph);
        assert_eq!(boundary_at(text, 6), Boundary::Paragraph);
        assert_eq!(boundary_at(text, 4), Boundary::Character);
        assert_eq!(
            boundary_at("a\n  \nb", 5),
            Boundary::Paragraph,
            "whitespace-only line"
        );
        assert_eq!(
            boundary_at("a\nb", 2),
            Boundary::Word,
            "a single line break"
        );
    }

    #[test]
    fn never_cuts_inside_a_character() {
        let text = "😀😀😀é́x";
        for size in 1..8 {
            let chunks = split(text, size);
            assert_eq!(chunks.concat(), text);
            assert!(chunks.iter().all(|c| c.chars().count() <= size));
        }
    }

    fn english_sentence() -> BoxedStrategy<String> {
        (
            prop::collection::vec("[a-zA-Z]{1,8}", 1..8),
            prop::sample::select(vec![".", "!", "?", "", ".\"", ","]),
        )
            .prop_map(|(words, end)| format!("{}{end}", words.join(" ")))
            .boxed()
    }

    fn chinese_sentence() -> BoxedStrategy<String> {
        let han = prop::sample::select(vec![
            '我', '们', '天', '气', '很', '好', '公', '园', '去', '吧', '中', '文',
        ]);
        (
            prop::collection::vec(han, 1..12),
            prop::sample::select(vec!["。", "！", "？", "？”", "”", "，", ""]),
        )
            .prop_map(|(chars, end)| format!("{}{end}", chars.into_iter().collect::<String>()))
            .boxed()
    }

    fn mixed_sentence() -> BoxedStrategy<String> {
        let odd = "[😀é\u{301}a-z0-9 ]{1,6}".prop_map(String::from);
        prop_oneof![4 => english_sentence(), 4 => chinese_sentence(), 1 => odd].boxed()
    }

    /// Sentences joined by spaces, nothing, line breaks and blank lines.
    fn document(sentence: BoxedStrategy<String>) -> BoxedStrategy<String> {
        let separator = prop::sample::select(vec![" ", "", "\n", "\n\n", "\n \n", "  ", "\t"]);
        prop::collection::vec((sentence, separator), 0..30)
            .prop_map(|parts| {
                parts
                    .into_iter()
                    .map(|(s, sep)| format!("{s}{sep}"))
                    .collect()
            })
            .boxed()
    }

    /// Every property of a split, checked on `text` cut at `size`.
    fn check_split(text: &str, size: usize) -> Result<(), TestCaseError> {
        let chunks = split(text, size);
        // Reassembly is exact, and every chunk is non-empty and within the bound. (Slices of a
        // `&str` cannot split a UTF-8 character: that would not compile or would have panicked.)
        prop_assert_eq!(chunks.concat(), text);
        for chunk in &chunks {
            let chars = chunk.chars().count();
            prop_assert!(
                chars >= 1 && chars <= size,
                "chunk {:?} has {} chars",
                chunk,
                chars
            );
        }
        let kinds = boundaries(text);
        let mut start = 0;
        let mut end_byte = 0;
        for chunk in &chunks[..chunks.len().saturating_sub(1)] {
            let cut = start + chunk.chars().count();
            let reach = start + size;
            let kind = kinds[cut];
            for (p, other) in kinds.iter().enumerate().take(reach + 1).skip(start + 1) {
                // Nothing better anywhere in reach, and nothing as good after the cut.
                prop_assert!(
                    *other <= kind,
                    "cut at {} is {:?} but {} in reach is {:?}: {:?}",
                    cut,
                    kind,
                    p,
                    other,
                    text
                );
                prop_assert!(
                    p <= cut || *other < kind || kind == Boundary::Character,
                    "a later {:?} at {} was in reach of the cut at {}: {:?}",
                    other,
                    p,
                    cut,
                    text
                );
            }
            // What each kind of cut looks like in the text before it.
            end_byte += chunk.len();
            let before = &text[..end_byte];
            match kind {
                Boundary::Paragraph => {
                    let last_line = before
                        .strip_suffix('\n')
                        .and_then(|body| body.rsplit_once('\n'))
                        .map(|(_, line)| line);
                    prop_assert!(
                        last_line.is_some_and(|line| line.trim().is_empty()),
                        "paragraph cut not after a blank line: {:?}",
                        before
                    );
                }
                Boundary::Sentence => {
                    let end = before.trim_end().trim_end_matches(CLOSERS).chars().last();
                    prop_assert!(
                        end.is_some_and(
                            |c| SENTENCE_ENDS_CJK.contains(&c) || SENTENCE_ENDS_LATIN.contains(&c)
                        ),
                        "sentence cut not after a sentence end: {:?}",
                        before
                    );
                }
                Boundary::Word => {
                    prop_assert!(
                        before.ends_with(char::is_whitespace),
                        "word cut not after whitespace: {:?}",
                        before
                    );
                }
                Boundary::Character => {
                    prop_assert_eq!(cut, reach, "a character cut uses the whole window")
                }
            }
            start = cut;
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn english_text_splits_exactly_within_bounds_at_the_best_boundary(
            text in document(english_sentence()), size in 1usize..60
        ) {
            check_split(&text, size)?;
        }

        #[test]
        fn chinese_text_splits_exactly_within_bounds_at_the_best_boundary(
            text in document(chinese_sentence()), size in 1usize..40
        ) {
            check_split(&text, size)?;
        }

        #[test]
        fn mixed_text_splits_exactly_within_bounds_at_the_best_boundary(
            text in document(mixed_sentence()), size in 1usize..60
        ) {
            check_split(&text, size)?;
        }

        #[test]
        fn any_unicode_input_splits_on_character_boundaries(text in "\\PC{0,200}", size in 1usize..40) {
            let chunks = split(&text, size);
            prop_assert_eq!(chunks.concat(), text.clone());
            prop_assert!(chunks.iter().all(|c| !c.is_empty() && c.chars().count() <= size));
        }
    }
}
