//! Stop strings over streamed text.
//!
//! Generated text reaches the client a piece at a time, but a stop string can be spread
//! over many pieces, and the client must never see a stop string or any part of it. So
//! text leaves the engine only once it is known not to be part of a stop: the end of the
//! text seen so far that could still grow into a stop string is held back until the next
//! pieces either complete the stop (generation ends and the held text is dropped) or rule
//! it out (the held text is released). Text arrives here already decoded into whole
//! UTF-8 characters (see `utf8`), and holding back only ever splits it at character
//! boundaries, so what is emitted stays whole characters too.

/// What to do after a piece of text has been matched against the stop strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopStep {
    /// No stop string has completed: send `emit` and keep generating.
    Continue { emit: String },
    /// A stop string has completed: send `emit`, the text before it, and stop generating.
    Stopped { emit: String },
}

/// Finds stop strings in text that arrives piece by piece.
#[derive(Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Byte length of the longest stop, which bounds how much text can need holding back.
    longest: usize,
    /// Text seen but not yet emitted, because a stop string might start in it.
    held: String,
    /// Set once a stop string has completed; later text comes after the stop and is
    /// never emitted.
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings would match before any text; the caller rejects them.
    pub fn new(stops: Vec<String>) -> Self {
        debug_assert!(
            stops.iter().all(|stop| !stop.is_empty()),
            "empty stop string"
        );
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            stops,
            longest,
            held: String::new(),
            stopped: false,
        }
    }

    /// Adds the next piece of text and says what can be sent and whether to stop.
    ///
    /// When stop strings complete in the text, the one that starts earliest wins. A stop
    /// that has completed ends matching at once, even if it lies inside a longer stop
    /// that is still only partly matched: generation ends as soon as any stop appears.
    pub fn push(&mut self, text: &str) -> StopStep {
        if self.stopped {
            return StopStep::Stopped {
                emit: String::new(),
            };
        }
        self.held.push_str(text);
        // A stop can only start in the held text: everything emitted earlier was emitted
        // because no stop could start there.
        let first_stop = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(start) = first_stop {
            self.held.truncate(start);
            self.stopped = true;
            return StopStep::Stopped {
                emit: std::mem::take(&mut self.held),
            };
        }
        let still_possible = self.held.split_off(self.partial_start());
        StopStep::Continue {
            emit: std::mem::replace(&mut self.held, still_possible),
        }
    }

    /// Ends the text without a stop (end of sequence, token limit): nothing can complete
    /// any more, so what was held back is ordinary text and is returned.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Where the earliest suffix of the held text that is a proper prefix of some stop
    /// begins, or the end of the held text if there is none.
    fn partial_start(&self) -> usize {
        // A proper prefix is shorter than its stop, so it can only begin in the last
        // `longest - 1` bytes; scanning from there keeps a long piece from costing its
        // length times the number of stops.
        let first_candidate = self
            .held
            .len()
            .saturating_sub(self.longest.saturating_sub(1));
        (first_candidate..self.held.len())
            .filter(|&at| self.held.is_char_boundary(at))
            .find(|&at| {
                self.stops
                    .iter()
                    .any(|stop| stop.starts_with(&self.held[at..]))
            })
            .unwrap_or(self.held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|stop| stop.to_string()).collect())
    }

    fn cont(emit: &str) -> StopStep {
        StopStep::Continue {
            emit: emit.to_string(),
        }
    }

    fn stopped(emit: &str) -> StopStep {
        StopStep::Stopped {
            emit: emit.to_string(),
        }
    }

    /// The steps for each piece, then what finish gave.
    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<StopStep>, String) {
        let mut matcher = matcher(stops);
        let steps = pieces.iter().map(|piece| matcher.push(piece)).collect();
        (steps, matcher.finish())
    }

    /// What the client ends up with: every emit, plus finish when no stop fired.
    fn output(stops: &[&str], pieces: &[&str]) -> String {
        let (steps, finished) = run(stops, pieces);
        let mut text = String::new();
        for step in steps {
            match step {
                StopStep::Continue { emit } => text.push_str(&emit),
                StopStep::Stopped { emit } => {
                    text.push_str(&emit);
                    return text;
                }
            }
        }
        text + &finished
    }

    /// The text up to the earliest-starting stop, found in the whole text at once.
    fn truncated_at_stop(stops: &[&str], text: &str) -> String {
        let end = stops
            .iter()
            .filter_map(|stop| text.find(stop))
            .min()
            .unwrap_or(text.len());
        text[..end].to_string()
    }

    /// The pieces of `text` cut at the given byte offsets.
    fn split_at<'a>(text: &'a str, cuts: &[usize]) -> Vec<&'a str> {
        let mut pieces = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain([text.len()].iter()) {
            pieces.push(&text[from..cut]);
            from = cut;
        }
        pieces
    }

    fn char_boundaries(text: &str) -> Vec<usize> {
        (0..=text.len())
            .filter(|&at| text.is_char_boundary(at))
            .collect()
    }

    #[test]
    fn without_stops_text_passes_through_at_once() {
        let (steps, finished) = run(&[], &["Hello", ", ", "\u{4f60}\u{597d}"]);
        assert_eq!(steps, [cont("Hello"), cont(", "), cont("\u{4f60}\u{597d}")]);
        assert_eq!(finished, "");
    }

    #[test]
    fn text_unrelated_to_the_stop_is_not_held() {
        let (steps, _) = run(&["STOP"], &["hello ", "world"]);
        assert_eq!(steps, [cont("hello "), cont("world")]);
    }

    #[test]
    fn stop_inside_one_piece() {
        let (steps, finished) = run(&["STOP"], &["hello STOP world"]);
        assert_eq!(steps, [stopped("hello ")]);
        assert_eq!(finished, "");
    }

    #[test]
    fn stop_spanning_pieces_is_never_emitted() {
        let (steps, finished) = run(&["STOP"], &["hel", "lo ST", "O", "P and more"]);
        assert_eq!(steps, [cont("hel"), cont("lo "), cont(""), stopped("")]);
        assert_eq!(finished, "");
    }

    #[test]
    fn false_start_is_released_when_ruled_out() {
        let (steps, finished) = run(&["abc"], &["xab", "d"]);
        assert_eq!(steps, [cont("x"), cont("abd")]);
        assert_eq!(finished, "");
    }

    #[test]
    fn overlapping_false_start_keeps_only_what_can_still_match() {
        // "ab" + "ab" + "c": the first "ab" is ruled out by the second 'a', which starts
        // the real match.
        let (steps, _) = run(&["abc"], &["ab", "a", "b", "c"]);
        assert_eq!(steps, [cont(""), cont("ab"), cont(""), stopped("")]);
        assert_eq!(output(&["abc"], &["ababc"]), "ab");
        assert_eq!(output(&["abc"], &["a", "b", "a", "b", "c"]), "ab");
        // A self-overlapping stop: "aab" only shows up after the third 'a'.
        assert_eq!(output(&["aab"], &["a", "a", "a", "b"]), "a");
    }

    #[test]
    fn stop_at_the_very_start() {
        assert_eq!(run(&["###"], &["###rest"]).0, [stopped("")]);
        assert_eq!(
            run(&["###"], &["#", "#", "#", "rest"]).0,
            [cont(""), cont(""), stopped(""), stopped("")]
        );
    }

    #[test]
    fn pushes_after_a_stop_emit_nothing() {
        let mut matcher = matcher(&["END"]);
        assert_eq!(matcher.push("done END tail"), stopped("done "));
        assert_eq!(matcher.push("more"), stopped(""));
        assert_eq!(matcher.finish(), "");
    }

    #[test]
    fn finish_flushes_held_text() {
        let mut matcher = matcher(&["STOP"]);
        assert_eq!(matcher.push("the end ST"), cont("the end "));
        assert_eq!(matcher.finish(), "ST");
        assert_eq!(matcher.finish(), "");
    }

    #[test]
    fn earliest_starting_stop_wins() {
        // Either order of the stops gives the same answer.
        for stops in [["world", "lo"], ["lo", "world"]] {
            assert_eq!(run(&stops, &["hello world"]).0, [stopped("hel")]);
        }
        // Two stops starting at the same place: the shorter is a prefix of the longer.
        assert_eq!(run(&["ab", "abc"], &["xabc"]).0, [stopped("x")]);
        // Completing in the same piece, the longer stop starts first.
        assert_eq!(run(&["c", "abcd"], &["xabcd"]).0, [stopped("x")]);
    }

    #[test]
    fn several_stops_hold_back_for_any_of_them() {
        let (steps, _) = run(
            &["<|end|>", "\n\nUser:"],
            &["Sure.", "\n", "\n", "Use", "d it", "<|", "end|>"],
        );
        assert_eq!(
            steps,
            [
                cont("Sure."),
                cont(""),
                cont(""),
                cont(""),
                cont("\n\nUsed it"),
                cont(""),
                stopped("")
            ]
        );
    }

    #[test]
    fn completed_stop_is_not_delayed_by_a_longer_one_in_progress() {
        // "abcd" might still complete, but "c" already has: generation ends now.
        let (steps, _) = run(&["abcd", "c"], &["ab", "c", "d"]);
        assert_eq!(steps, [cont(""), stopped("ab"), stopped("")]);
    }

    #[test]
    fn multibyte_stops_and_text() {
        // "。" is three bytes; the held text must be split only between characters.
        let (steps, _) = run(&["\u{3002}\n"], &["\u{4f60}\u{597d}\u{3002}", "\n\u{518d}"]);
        assert_eq!(steps, [cont("\u{4f60}\u{597d}"), stopped("")]);

        let (steps, finished) = run(&["\u{1f44b}bye"], &["hi \u{1f44b}", "b", "x"]);
        assert_eq!(steps, [cont("hi "), cont(""), cont("\u{1f44b}bx")]);
        assert_eq!(finished, "");

        // Same lead byte as the stop's first character, different character: not held.
        assert_eq!(run(&["\u{e9}"], &["\u{e3}"]).0, [cont("\u{e3}")]);
        assert_eq!(
            run(&["caf\u{e9}"], &["un caf", "\u{e9}!"]).0,
            [cont("un "), stopped("")]
        );
    }

    #[test]
    fn held_text_is_exactly_the_longest_possible_stop_start() {
        let stops = ["abcab", "\u{3002}\u{3002}x", "ba"];
        let text = "xxabcaxabcaxab\u{3002}\u{3002}y\u{3002}b";
        let mut matcher = matcher(&stops);
        let mut seen = String::new();
        let mut sent = String::new();
        for piece in text.split_inclusive(|_| true) {
            seen.push_str(piece);
            match matcher.push(piece) {
                StopStep::Continue { emit } => sent.push_str(&emit),
                StopStep::Stopped { .. } => panic!("no stop in {seen:?}"),
            }
            assert_eq!(format!("{sent}{}", matcher.held), seen);
            // No later split of what was sent could have been part of a stop, and
            // nothing held could have been sent.
            let longest_partial = char_boundaries(&seen)
                .into_iter()
                .filter(|&at| at < seen.len())
                .find(|&at| stops.iter().any(|stop| stop.starts_with(&seen[at..])))
                .map_or("", |at| &seen[at..]);
            assert_eq!(matcher.held, longest_partial, "after {seen:?}");
        }
        assert_eq!(sent + &matcher.finish(), text);
    }

    #[test]
    fn output_is_the_input_up_to_the_stop_however_it_is_split() {
        let cases: &[(&[&str], &str)] = &[
            (&["abc"], "xx ababc yy"),
            (&["abc"], "ab ab a"),
            (&["aab"], "aaaab!"),
            (&["STOP", "END"], "one ST two ENDSTOP"),
            (
                &["\u{1f6d1}", "\u{3002}\u{3002}"],
                "\u{4f60}\u{3002}\u{597d}\u{3002}\u{3002}\u{1f6d1}",
            ),
            (&["\u{1f6d1}x"], "\u{1f6d1}\u{1f6d1}\u{1f6d1}"),
            (&["<|end|>", "<|user|>"], "a<|en<|use<|user|>"),
            (&["stop"], "no stop words here? stop"),
            (&["never"], "caf\u{e9} \u{1f600}"),
            (&[], "plain"),
        ];
        for &(stops, text) in cases {
            let expected = truncated_at_stop(stops, text);
            let bounds = char_boundaries(text);
            for &i in &bounds {
                for &j in bounds.iter().filter(|&&j| j >= i) {
                    let pieces = split_at(text, &[i, j]);
                    assert_eq!(
                        output(stops, &pieces),
                        expected,
                        "{stops:?} over {pieces:?}"
                    );
                }
            }
            let chars: Vec<&str> = text.split_inclusive(|_| true).collect();
            assert_eq!(output(stops, &chars), expected, "{stops:?} over {chars:?}");
        }
    }
}
