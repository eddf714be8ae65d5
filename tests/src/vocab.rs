//! A generated Phi-3-style tokenizer vocabulary, so that test models tokenize, template and stop
//! like Phi-3 without shipping Microsoft's 32,064-token vocabulary.
//!
//! The layout mirrors the real `tokenizer.*` keys of Phi-3-mini (a SentencePiece "llama" model
//! with byte fallback): the same ids, texts, types and scores for every special, byte and padding
//! token (including the real file's quirks: `<unk>` is a control token, `</s>` a user-defined
//! one), and the same special-token ids and flags, so that code under test sees `<s>` = 1,
//! `<|endoftext|>` = 32000, `<|end|>` = 32007, `<|user|>` = 32010 and so on. Only the ordinary
//! pieces (ids 259..32000) differ: common English words and subwords, then made-up filler words.
//! Text therefore splits into different (usually more) pieces than with the real vocabulary, but
//! every string still tokenizes, thanks to byte fallback.

use std::collections::HashSet;

use crate::gguf::Value;

/// Number of tokens, as in Phi-3-mini (the embedding matrix has one row per token).
pub const N_VOCAB: usize = 32064;

pub const UNK: u32 = 0;
pub const BOS: u32 = 1;
pub const EOS_SENTENCEPIECE: u32 = 2;
pub const ENDOFTEXT: u32 = 32000;
pub const ASSISTANT: u32 = 32001;
pub const SYSTEM: u32 = 32006;
pub const END: u32 = 32007;
pub const USER: u32 = 32010;

/// The first byte-fallback token, `<0x00>`; `<0xFF>` is 258.
const FIRST_BYTE: usize = 3;
const FIRST_PIECE: usize = FIRST_BYTE + 256;
/// Ids from here on are Phi-3's added tokens (specials and padding).
const FIRST_ADDED: usize = 32000;

/// Phi-4-mini's tool tags, for [`Vocab::phi3_with_tool_tags`].
pub const PHI4_TOOL_TAGS: [&str; 5] = ["<|tool|>", "<|/tool|>", "<|tool_call|>", "<|/tool_call|>", "<|tool_response|>"];

/// The first `[PAD<id>]` token, after the Phi-3 added tokens.
const FIRST_PAD: usize = 32011;

/// The Phi-3 added tokens at 32000..=32010; the rest up to `N_VOCAB` are `[PAD<id>]`.
const ADDED_SPECIALS: [&str; 11] = [
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
];

/// The Phi-3-mini-instruct chat template (the revision that supports a system turn). llama.cpp
/// recognises it as its built-in "phi3" format because it contains `<|assistant|>` and
/// `<|end|>`.
pub const PHI3_CHAT_TEMPLATE: &str = "{% for message in messages %}\
{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}\
{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}\
{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}\
{% endif %}{% endfor %}\
{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}";

/// SentencePiece's marker for a space.
const SPACE: char = '\u{2581}';

/// The real vocabulary scores whitespace runs (and the bare space marker) so low that they merge
/// last; copying that keeps leading-space handling identical (" Hello" becomes `▁` `▁Hello`).
const WHITESPACE_SCORE: f32 = -1e9;
const SPECIAL_SCORE: f32 = -1000.0;
const PAD_SCORE: f32 = -10000.0;

/// The `tokenizer.ggml.token_type` values used here (llama.cpp's `llama_token_type`, which also
/// has 5 for unused tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Byte = 6,
}

/// English words that become `▁word`, `▁Word` and `word` pieces.
const WORDS: &str = "
the of and to in is it that was for on are as with his they at be this from have or by one had
not but what all were when we there can an your which their said if do will each about how up out
them then she many some so these would other into has more her two like him see time could no
make than first been its who now people my made over did down only way find use may water long
little very after words called just where most know get through back much go good new write our
me man too any day same right look think also around another came come work three word must
because does part even place well such here take why things help put years different away again
off went old number great tell men say small every found still between name should home big give
air line set own under read last never us left end along while might next sound below saw
something thought both few those always looked show large often together asked house don world
going want school important until form food keep children feet land side without boy once animals
life enough took sometimes four head above kind began almost live page got earth need far hand
high year mother light parts country father let night following picture being study second eyes
soon times story boys since white days ever paper hard near sentence better best across during
today others however sure means knew try told young miles sun ways thing whole hear example heard
several change answer room sea against top turned learn point city play toward five using himself
usually money seen car morning given body family later order open hello thanks please yes model
data text token test code file system user assistant message chat server request response error
value string number function return true false null list input output stream model models run
running stop start time memory context prompt generate generation sample language phi mini small
question questions help helpful answer answers explain write wrote written story poem summary
simple quick brown fox jumps lazy dog cat cats dogs bird tree river mountain ocean rain snow
weather today tomorrow yesterday week month months year years hour hours minute minutes second
seconds computer program programming software hardware network internet web page browser email
phone mobile app application service services cloud storage database query table index key keys
red green blue black yellow orange purple color colors number numbers one two three four five six
seven eight nine ten hundred thousand million billion first last next previous new old good bad
great small large big little long short high low early late hot cold happy sad love hate like
friend friends family mother father brother sister child children baby man woman men women boy
girl person people human humans animal animals world country countries city cities state states
government president law laws history science math physics chemistry biology art music book
books read reading writing words sentence sentences paragraph document documents title name names
normal multiple discards era apple month concatenated emojis only own token tokens special
";

/// Continuations without a leading space: suffixes, word parts and punctuation clusters.
const SUBWORDS: &str = "
ing ed er es ly tion tions ment ments ness able ible al ive ous ful less est ers ity ize ise ism ist
ists ance ence ant ent ic ical ure age ship hood ward wise like ies ied ion ions ation ations ated
ating ate ates ter ters ry ary ory ory al ally ually ial ian ians ism ing ings ng nd st th he an in
re on at en or es is it ar ou le ti te se ve me ne de co ro ra ri li la lo ma mi mo pe pi po pa
un dis pre pro con com sub inter trans over under out up non anti auto bi tri multi semi
's 't 're 've 'll 'd 'm n't .. ... !! !!! ?? ?! -- --- -> => == != <= >= // /* */ :: () (); {} []
\", ', ). ), ); .\" ,\" :// www .com .org .net http https html json xml cpp py rs js
";

/// Consonant/vowel syllables for filler words, which read as words in generated text.
const ONSETS: [&str; 16] = [
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "tr",
];
const VOWELS: [&str; 5] = ["a", "e", "i", "o", "u"];

/// A whole vocabulary, indexed by token id.
#[derive(Clone, Debug, PartialEq)]
pub struct Vocab {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub types: Vec<TokenType>,
}

impl Vocab {
    /// Builds the Phi-3-style vocabulary; deterministic.
    pub fn phi3() -> Self {
        let mut v = Self {
            tokens: Vec::new(),
            scores: Vec::new(),
            types: Vec::new(),
        };
        v.push("<unk>", SPECIAL_SCORE, TokenType::Control);
        v.push("<s>", SPECIAL_SCORE, TokenType::Control);
        v.push("</s>", SPECIAL_SCORE, TokenType::UserDefined);
        for b in 0..=255u8 {
            v.push(&format!("<0x{b:02X}>"), 0.0, TokenType::Byte);
        }

        let pieces = ordinary_pieces(FIRST_ADDED - FIRST_PIECE);
        for (rank, piece) in pieces.iter().enumerate() {
            let score = if piece.chars().all(|c| c == SPACE) {
                WHITESPACE_SCORE
            } else {
                -(rank as f32 + 1.0)
            };
            v.push(piece, score, TokenType::Normal);
        }

        for special in ADDED_SPECIALS {
            v.push(special, SPECIAL_SCORE, TokenType::Control);
        }
        while v.tokens.len() < N_VOCAB {
            // Phi-3 pads its embedding matrix with these never-produced tokens.
            v.push(
                &format!("[PAD{}]", v.tokens.len()),
                PAD_SCORE,
                TokenType::Unknown,
            );
        }
        v
    }

    /// The Phi-3-style vocabulary with Phi-4-mini's tool tags in place of the first padding
    /// tokens, as special tokens: a model with it uses phi3d's native tool-call format.
    pub fn phi3_with_tool_tags() -> Self {
        let mut v = Self::phi3();
        for (offset, tag) in PHI4_TOOL_TAGS.iter().enumerate() {
            let id = FIRST_PAD + offset;
            v.tokens[id] = (*tag).to_owned();
            v.scores[id] = SPECIAL_SCORE;
            v.types[id] = TokenType::UserDefined;
        }
        v
    }

    fn push(&mut self, text: &str, score: f32, ty: TokenType) {
        self.tokens.push(text.to_owned());
        self.scores.push(score);
        self.types.push(ty);
    }

    /// Every `tokenizer.*` key llama.cpp reads for a Phi-3 model, with the values Phi-3-mini has.
    /// Like the real file, there is no `eot_token_id`: llama.cpp finds one by its text
    /// (`<|end|>` or `<|endoftext|>`, whichever its hash map yields first) and stops on both.
    pub fn metadata(&self) -> Vec<(String, Value)> {
        [
            ("tokenizer.ggml.model", Value::str("llama")),
            ("tokenizer.ggml.pre", Value::str("default")),
            (
                "tokenizer.ggml.tokens",
                Value::strings(self.tokens.iter().cloned()),
            ),
            (
                "tokenizer.ggml.scores",
                Value::f32s(self.scores.iter().copied()),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::i32s(self.types.iter().map(|&t| t as i32)),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(BOS)),
            ("tokenizer.ggml.eos_token_id", Value::U32(ENDOFTEXT)),
            ("tokenizer.ggml.unknown_token_id", Value::U32(UNK)),
            ("tokenizer.ggml.padding_token_id", Value::U32(ENDOFTEXT)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
            ("tokenizer.ggml.add_eos_token", Value::Bool(false)),
            ("tokenizer.chat_template", Value::str(PHI3_CHAT_TEMPLATE)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// Exactly `count` distinct pieces, best (most mergeable) first.
///
/// llama.cpp's SentencePiece tokenizer builds pieces by repeatedly merging adjacent symbols whose
/// concatenation is in the vocabulary, so a long piece is only reachable through shorter ones.
/// Adding every prefix of every word guarantees a path, and ranking shorter pieces higher makes
/// them merge first, as in a trained BPE vocabulary.
fn ordinary_pieces(count: usize) -> Vec<String> {
    let mut multi = Vec::new();
    let mut seen = HashSet::new();
    let mut add_with_prefixes = |piece: &str, multi: &mut Vec<String>| {
        let ends = piece
            .char_indices()
            .skip(1)
            .map(|(i, _)| i)
            .chain([piece.len()]);
        for end in ends.skip(1) {
            if seen.insert(piece[..end].to_owned()) {
                multi.push(piece[..end].to_owned());
            }
        }
    };

    for n in 2..=16 {
        add_with_prefixes(&SPACE.to_string().repeat(n), &mut multi);
    }
    for word in WORDS.split_whitespace() {
        add_with_prefixes(&format!("{SPACE}{word}"), &mut multi);
        add_with_prefixes(&format!("{SPACE}{}", capitalize(word)), &mut multi);
    }
    // Bare words, for text glued to punctuation or other words ("(normal)", "myapple").
    for word in WORDS.split_whitespace() {
        add_with_prefixes(word, &mut multi);
    }
    for sub in SUBWORDS.split_whitespace() {
        add_with_prefixes(sub, &mut multi);
    }
    for c in (0x21u8..=0x7e)
        .map(char::from)
        .filter(|c| !c.is_ascii_alphanumeric())
    {
        add_with_prefixes(&format!("{SPACE}{c}"), &mut multi);
    }
    for c in (b'a'..=b'z').chain(b'A'..=b'Z').map(char::from) {
        add_with_prefixes(&format!("{SPACE}{c}"), &mut multi);
    }
    // Stable sort: among equal lengths, the order above (frequent words first) decides.
    multi.sort_by_key(|p| p.chars().count());

    // Single characters close the list, as in the real vocabulary; they never come from a merge,
    // so their rank does not matter. Digits stay single, as Phi-3 splits numbers into digits.
    let singles: Vec<String> = std::iter::once(SPACE)
        .chain((0x21u8..=0x7e).map(char::from))
        .map(String::from)
        .collect();
    let filler_needed = count
        .checked_sub(multi.len() + singles.len())
        .expect("word lists outgrew the vocabulary");

    let syllables: Vec<String> = ONSETS
        .iter()
        .flat_map(|o| VOWELS.iter().map(move |v| format!("{o}{v}")))
        .collect();
    let n = syllables.len();
    let filler: Vec<String> = (0..n * n * n)
        .map(|i| {
            format!(
                "{SPACE}{}{}{}",
                syllables[i % n],
                syllables[i / n % n],
                syllables[i / n / n]
            )
        })
        .filter(|word| seen.insert(word.clone()))
        .take(filler_needed)
        .collect();
    assert_eq!(filler.len(), filler_needed, "ran out of filler words");

    multi.into_iter().chain(filler).chain(singles).collect()
}

fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;
    use std::path::Path;

    #[test]
    fn layout_matches_phi3() {
        let v = Vocab::phi3();
        assert_eq!(
            (v.tokens.len(), v.scores.len(), v.types.len()),
            (N_VOCAB, N_VOCAB, N_VOCAB)
        );
        let distinct: HashSet<&String> = v.tokens.iter().collect();
        assert_eq!(distinct.len(), N_VOCAB, "duplicate pieces");
        for (id, text) in [
            (UNK, "<unk>"),
            (BOS, "<s>"),
            (EOS_SENTENCEPIECE, "</s>"),
            (3, "<0x00>"),
            (13, "<0x0A>"),
            (258, "<0xFF>"),
            (ENDOFTEXT, "<|endoftext|>"),
            (ASSISTANT, "<|assistant|>"),
            (SYSTEM, "<|system|>"),
            (END, "<|end|>"),
            (USER, "<|user|>"),
            (32011, "[PAD32011]"),
            (32063, "[PAD32063]"),
        ] {
            assert_eq!(v.tokens[id as usize], text);
        }
        let count = |ty| v.types.iter().filter(|&&t| t == ty).count();
        assert_eq!(
            [
                TokenType::Normal,
                TokenType::Byte,
                TokenType::Unknown,
                TokenType::Control,
                TokenType::UserDefined
            ]
            .map(count),
            [31741, 256, 53, 13, 1]
        );
        let ordinary = &v.scores[FIRST_PIECE..FIRST_ADDED];
        assert!(ordinary.iter().all(|s| *s < 0.0));
    }

    #[test]
    fn every_word_piece_can_be_built_by_merges() {
        let v = Vocab::phi3();
        let known: HashSet<&str> = v.tokens.iter().map(String::as_str).collect();
        for word in WORDS.split_whitespace() {
            let piece = format!("{SPACE}{word}");
            for (end, _) in piece.char_indices().skip(2) {
                assert!(
                    known.contains(&piece[..end]),
                    "{piece}: no {}",
                    &piece[..end]
                );
            }
            assert!(known.contains(piece.as_str()));
        }
        for c in (0x21u8..=0x7e).map(char::from) {
            assert!(known.contains(c.to_string().as_str()), "no single {c:?}");
        }
    }

    /// The special, byte and padding tokens and the special-token keys must equal the real
    /// Phi-3 tokenizer's (when llama.cpp's copy of it is at hand).
    #[test]
    fn specials_equal_the_real_phi3_vocab() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/ggml-vocab-phi-3.gguf");
        if !path.is_file() {
            crate::skip_outside_repository(format!("{} is absent (the real Phi-3 tokenizer)", path.display()));
            return;
        }
        let real = GgufFile::open(&path).unwrap();
        let ours = Vocab::phi3().metadata();
        let get = |key: &str| ours.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        for (key, value) in &ours {
            match key.as_str() {
                "tokenizer.ggml.tokens" | "tokenizer.ggml.scores" | "tokenizer.ggml.token_type" => {
                }
                "tokenizer.chat_template" => {}
                _ => assert_eq!(real.get(key), Some(value), "{key}"),
            }
        }
        let real_keys: Vec<&str> = real.metadata.iter().map(|(k, _)| k.as_str()).collect();
        for key in real_keys.iter().filter(|k| k.starts_with("tokenizer.")) {
            assert!(get(key).is_some(), "missing {key}");
        }
        let items = |key: &str| real.get(key).unwrap().as_array().unwrap().items().to_vec();
        let mine = |key: &str| get(key).unwrap().as_array().unwrap().items().to_vec();
        for key in [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.scores",
            "tokenizer.ggml.token_type",
        ] {
            let (theirs, ours) = (items(key), mine(key));
            assert_eq!(theirs.len(), ours.len(), "{key}");
            for id in (0..FIRST_PIECE).chain(FIRST_ADDED..N_VOCAB) {
                assert_eq!(theirs[id], ours[id], "{key}[{id}]");
            }
        }
    }
}
