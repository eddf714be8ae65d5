//! Incremental UTF-8 decoding of token pieces.
//!
//! A token's piece is a run of bytes, not a string: byte-level vocabularies split emoji,
//! CJK and other multi-byte characters across tokens, and a model can emit byte sequences
//! that are not UTF-8 at all. Text leaves the engine only as whole UTF-8 characters, so
//! this decoder sits between the sampler and everything that handles text (stop strings,
//! the gRPC stream): it holds back the start of a character until its last byte arrives,
//! and turns invalid bytes into U+FFFD as soon as they are known to be invalid, so a bad
//! token never stalls the stream. The output of all `push` calls plus `finish` is exactly
//! what `String::from_utf8_lossy` gives for all the bytes at once, however they were split.

use std::char::REPLACEMENT_CHARACTER;

/// Turns a stream of byte pieces into text that is always whole, valid UTF-8.
#[derive(Debug, Default)]
pub struct Utf8Decoder {
    /// The start of a character whose remaining bytes have not arrived yet: a valid
    /// prefix of a UTF-8 sequence, so never more than 3 bytes.
    pending: Vec<u8>,
}

impl Utf8Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next piece and returns every character that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        if self.pending.is_empty() {
            return self.decode(bytes);
        }
        // The held bytes must be decoded together with the new ones: only then can the
        // split character be completed, or be found invalid at the right byte.
        let mut joined = std::mem::take(&mut self.pending);
        joined.extend_from_slice(bytes);
        self.decode(&joined)
    }

    /// Ends the stream: a character that never completed becomes one U+FFFD.
    pub fn finish(&mut self) -> String {
        if std::mem::take(&mut self.pending).is_empty() {
            String::new()
        } else {
            // What is held is a prefix of a single sequence, which `from_utf8_lossy` also
            // replaces with a single U+FFFD.
            REPLACEMENT_CHARACTER.to_string()
        }
    }

    /// Decodes `bytes` lossily, except that a truncated sequence at the very end is kept in
    /// `pending` instead, because the next piece may complete it.
    fn decode(&mut self, bytes: &[u8]) -> String {
        let mut text = String::with_capacity(bytes.len());
        let mut chunks = bytes.utf8_chunks().peekable();
        while let Some(chunk) = chunks.next() {
            text.push_str(chunk.valid());
            let invalid = chunk.invalid();
            if invalid.is_empty() {
                continue;
            }
            // Only the last chunk's invalid part touches the end of the input, and only
            // there can the bytes be a character cut short rather than a real error.
            if chunks.peek().is_none() && is_truncated(invalid) {
                self.pending.extend_from_slice(invalid);
            } else {
                text.push(REPLACEMENT_CHARACTER);
            }
        }
        text
    }
}

/// Whether `bytes` could still become valid if more bytes followed.
fn is_truncated(bytes: &[u8]) -> bool {
    matches!(std::str::from_utf8(bytes), Err(error) if error.error_len().is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` in order and returns what each push gave plus what finish gave.
    fn feed(pieces: &[&[u8]]) -> (Vec<String>, String) {
        let mut decoder = Utf8Decoder::new();
        let pushed = pieces.iter().map(|piece| decoder.push(piece)).collect();
        (pushed, decoder.finish())
    }

    fn joined(pieces: &[&[u8]]) -> String {
        let (pushed, finished) = feed(pieces);
        pushed.concat() + &finished
    }

    /// Byte strings that mix valid text with every kind of UTF-8 error.
    const SAMPLES: &[&[u8]] = &[
        b"plain ascii",
        "caf\u{e9} \u{4f60}\u{597d} \u{1f600}\u{1f44d}\u{1f3fd}".as_bytes(),
        b"a\x80b",                       // lone continuation byte
        b"\xe2\x28\xa1",                 // lead byte followed by a non-continuation
        b"x\xf0\x9f\x98",                // truncated emoji at the end
        b"\xf0\x9f\x98 then more",       // truncated emoji mid-stream
        b"\xed\xa0\x80",                 // encoded surrogate
        b"\xc0\xaf",                     // overlong encoding
        b"\xf4\x90\x80\x80",             // beyond U+10FFFF
        b"\xff\xfe\xfd",                 // bytes that never appear in UTF-8
        b"\xe4\xbd\xe5\xa5\xbd",         // truncated CJK character followed by a whole one
        b"\xf0\x9f\x98\x80\xf0\x9f\x98", // whole emoji, then a truncated one
        b"",
    ];

    #[test]
    fn ascii_passes_through_at_once() {
        let (pushed, finished) = feed(&[b"Hello", b", ", b"world"]);
        assert_eq!(pushed, ["Hello", ", ", "world"]);
        assert_eq!(finished, "");
    }

    #[test]
    fn emoji_split_byte_by_byte_appears_when_complete() {
        let bytes = "\u{1f600}".as_bytes();
        let pieces: Vec<&[u8]> = bytes.chunks(1).collect();
        let (pushed, finished) = feed(&pieces);
        assert_eq!(pushed, ["", "", "", "\u{1f600}"]);
        assert_eq!(finished, "");
    }

    #[test]
    fn cjk_split_across_pieces_with_text_around() {
        // "你好!" is e4 bd a0 e5 a5 bd 21.
        let (pushed, finished) = feed(&[b"\xe4", b"\xbd\xa0\xe5\xa5", b"\xbd!"]);
        assert_eq!(pushed, ["", "\u{4f60}", "\u{597d}!"]);
        assert_eq!(finished, "");
    }

    #[test]
    fn text_before_a_split_character_is_not_held() {
        let (pushed, _) = feed(&[b"ok \xf0\x9f", b"\x91\x8d done"]);
        assert_eq!(pushed, ["ok ", "\u{1f44d} done"]);
    }

    #[test]
    fn invalid_bytes_mid_stream_are_replaced_without_stalling() {
        let mut decoder = Utf8Decoder::new();
        assert_eq!(decoder.push(b"a\x80"), "a\u{fffd}");
        // A lead byte followed by a non-continuation byte is known bad at once.
        assert_eq!(decoder.push(b"\xe2"), "");
        assert_eq!(decoder.push(b"("), "\u{fffd}(");
        assert_eq!(decoder.push(b"\xff"), "\u{fffd}");
        assert_eq!(decoder.push(b"b"), "b");
        assert_eq!(decoder.finish(), "");
    }

    #[test]
    fn each_maximal_invalid_subpart_gives_one_replacement() {
        // A truncated 3-byte sequence is one subpart; the surrogate's bytes are three.
        assert_eq!(joined(&[b"\xe4\xbd", b"x"]), "\u{fffd}x");
        assert_eq!(
            joined(&[b"\xed", b"\xa0", b"\x80"]),
            "\u{fffd}\u{fffd}\u{fffd}"
        );
    }

    #[test]
    fn truncated_sequence_at_finish_becomes_one_replacement() {
        let mut decoder = Utf8Decoder::new();
        assert_eq!(decoder.push(b"end \xf0\x9f\x98"), "end ");
        assert_eq!(decoder.finish(), "\u{fffd}");
        // The decoder is empty again and can be reused.
        assert_eq!(decoder.finish(), "");
        assert_eq!(decoder.push("\u{e9}".as_bytes()), "\u{e9}");
    }

    #[test]
    fn empty_pieces_change_nothing() {
        let (pushed, finished) = feed(&[b"", b"\xc3", b"", b"\xa9", b""]);
        assert_eq!(pushed, ["", "", "", "\u{e9}", ""]);
        assert_eq!(finished, "");
    }

    #[test]
    fn matches_lossy_decoding_for_every_two_and_three_way_split() {
        for &bytes in SAMPLES {
            let expected = String::from_utf8_lossy(bytes);
            for i in 0..=bytes.len() {
                for j in i..=bytes.len() {
                    let pieces = [&bytes[..i], &bytes[i..j], &bytes[j..]];
                    assert_eq!(joined(&pieces), expected, "{bytes:x?} split at {i} and {j}");
                }
            }
        }
    }

    #[test]
    fn matches_lossy_decoding_byte_by_byte_and_concatenated() {
        let all: Vec<u8> = SAMPLES.concat();
        let pieces: Vec<&[u8]> = all.chunks(1).collect();
        assert_eq!(joined(&pieces), String::from_utf8_lossy(&all));
    }

    #[test]
    fn never_holds_more_than_an_incomplete_character() {
        let all: Vec<u8> = SAMPLES.concat();
        let mut decoder = Utf8Decoder::new();
        for byte in all.chunks(1) {
            decoder.push(byte);
            assert!(decoder.pending.len() <= 3);
            assert!(decoder.pending.is_empty() || is_truncated(&decoder.pending));
        }
    }
}
