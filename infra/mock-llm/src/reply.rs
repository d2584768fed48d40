//! The deterministic reply: its text, its length in tokens and the prompt token count.
//!
//! One token is one whitespace-separated word. That keeps the arithmetic obvious to a test
//! author: `tokens=K` yields exactly K words, and the usage numbers can be recomputed by hand.

use crate::options::strip_directives;

/// How much of the last user message the summary prefix echoes.
const ECHO_CHARS: usize = 40;

/// Each message costs its words plus this, standing in for the role and framing tokens real
/// tokenizers add per message.
const PER_MESSAGE_OVERHEAD: u64 = 4;

const FILLER: &[&str] = &[
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua",
];

/// One input message reduced to what the mock looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    pub role: String,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// A composed reply, kept as words so the streaming and the non-streaming paths cannot drift.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    words: Vec<String>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: u64,
}

impl Completion {
    /// Builds the reply for `turns`: the summary prefix, then filler up to `target_words`, then
    /// truncated to `max_tokens` when the client set one.
    pub fn compose(turns: &[ChatTurn], target_words: usize, max_tokens: Option<u64>) -> Self {
        let mut words: Vec<String> = summary_prefix(turns)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let filler_needed = target_words.saturating_sub(words.len());
        words.extend(
            FILLER
                .iter()
                .cycle()
                .take(filler_needed)
                .map(|w| (*w).to_owned()),
        );
        let limit = max_tokens.map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
        let finish_reason = if words.len() > limit {
            words.truncate(limit);
            FinishReason::Length
        } else {
            FinishReason::Stop
        };
        Self {
            words,
            finish_reason,
            prompt_tokens: prompt_tokens(turns),
        }
    }

    /// The full message content: the words joined by single spaces.
    pub fn content(&self) -> String {
        self.words.join(" ")
    }

    /// The streamed pieces, one per token; they concatenate to exactly [`Self::content`].
    pub fn pieces(&self) -> impl Iterator<Item = String> + '_ {
        self.words.iter().enumerate().map(|(i, word)| {
            if i == 0 {
                word.clone()
            } else {
                format!(" {word}")
            }
        })
    }

    pub fn completion_tokens(&self) -> u64 {
        u64::try_from(self.words.len()).unwrap_or(u64::MAX)
    }
}

/// `[mock] messages=<N> last=<excerpt>`, telling a test what the upstream actually received.
///
/// The excerpt is the last user message with directives removed and whitespace runs collapsed
/// to single spaces (the reply is a list of words, so other whitespace could not survive
/// anyway), cut to its first [`ECHO_CHARS`] characters.
pub fn summary_prefix(turns: &[ChatTurn]) -> String {
    let last_user = turns
        .iter()
        .rev()
        .find(|turn| turn.role == "user")
        .map_or("", |turn| turn.text.as_str());
    let collapsed = strip_directives(last_user)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let excerpt: String = collapsed.chars().take(ECHO_CHARS).collect();
    format!(
        "[mock] messages={} last={}",
        turns.len(),
        excerpt.trim_end()
    )
}

/// Sum over messages of their word count plus a fixed per-message overhead.
pub fn prompt_tokens(turns: &[ChatTurn]) -> u64 {
    turns
        .iter()
        .map(|turn| word_count(&turn.text).saturating_add(PER_MESSAGE_OVERHEAD))
        .fold(0, u64::saturating_add)
}

pub fn word_count(text: &str) -> u64 {
    u64::try_from(text.split_whitespace().count()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(role: &str, text: &str) -> ChatTurn {
        ChatTurn {
            role: role.to_owned(),
            text: text.to_owned(),
        }
    }

    #[test]
    fn prefix_counts_messages_and_echoes_last_user_message() {
        let turns = [
            turn("system", "be brief"),
            turn("user", "first question"),
            turn("assistant", "answer"),
            turn("user", "  second   question [mock tokens=30] please "),
        ];
        assert_eq!(
            summary_prefix(&turns),
            "[mock] messages=4 last=second question please"
        );
    }

    #[test]
    fn prefix_echo_is_cut_at_forty_characters() {
        let long = "abcdefghij".repeat(10);
        let prefix = summary_prefix(&[turn("user", &long)]);
        assert_eq!(prefix, format!("[mock] messages=1 last={}", &long[..40]));
        let accented = "é".repeat(50);
        let prefix = summary_prefix(&[turn("user", &accented)]);
        assert!(prefix.ends_with(&"é".repeat(40)));
    }

    #[test]
    fn completion_has_exactly_the_requested_word_count() {
        let turns = [turn("user", "hello")];
        for target in [3, 4, 12, 50] {
            let completion = Completion::compose(&turns, target, None);
            assert_eq!(completion.completion_tokens(), target as u64);
            assert_eq!(word_count(&completion.content()), target as u64);
            assert_eq!(completion.finish_reason, FinishReason::Stop);
        }
        assert!(
            Completion::compose(&turns, 12, None)
                .content()
                .starts_with("[mock] messages=1 last=hello lorem ipsum")
        );
    }

    #[test]
    fn prefix_is_kept_whole_when_longer_than_the_target() {
        let turns = [turn("user", "one two three four five")];
        let completion = Completion::compose(&turns, 2, None);
        assert_eq!(
            completion.content(),
            "[mock] messages=1 last=one two three four five"
        );
        assert_eq!(completion.finish_reason, FinishReason::Stop);
    }

    #[test]
    fn max_tokens_truncates_and_reports_length() {
        let turns = [turn("user", "hello")];
        let completion = Completion::compose(&turns, 12, Some(5));
        assert_eq!(completion.completion_tokens(), 5);
        assert_eq!(completion.finish_reason, FinishReason::Length);
        let roomy = Completion::compose(&turns, 12, Some(12));
        assert_eq!(roomy.finish_reason, FinishReason::Stop);
    }

    #[test]
    fn pieces_concatenate_to_the_content() {
        let completion = Completion::compose(&[turn("user", "a b")], 9, None);
        let joined: String = completion.pieces().collect();
        assert_eq!(joined, completion.content());
        assert_eq!(completion.pieces().count(), 9);
    }

    #[test]
    fn prompt_tokens_adds_overhead_per_message() {
        let turns = [turn("system", "be brief"), turn("user", "one two three")];
        assert_eq!(prompt_tokens(&turns), (2 + 4) + (3 + 4));
        assert_eq!(prompt_tokens(&[]), 0);
    }
}
