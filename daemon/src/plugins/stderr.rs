//! A plugin's stderr: drained into phi3d's log, bounded, with the last lines kept for errors.
//!
//! The pipe is always drained, because a plugin blocked on a full stderr pipe would look
//! hung. What reaches the log is bounded twice: each line is cut at [`MAX_LINE`] bytes
//! (the rest of it is read and thrown away, never buffered), and at most
//! [`LINES_PER_MINUTE`] lines are logged per minute, so a plugin cannot flood the journal of a
//! small device. The last few lines are kept so that a crash report can quote them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio_util::sync::CancellationToken;

/// Longest stderr line logged; longer ones are cut.
const MAX_LINE: usize = 1024;
/// Lines logged per minute before the rest of that minute is only counted.
const LINES_PER_MINUTE: u32 = 120;
/// Lines kept for crash reports.
const TAIL_LINES: usize = 5;

/// The last lines a plugin wrote to stderr.
#[derive(Debug, Clone, Default)]
pub struct StderrTail {
    lines: Arc<Mutex<VecDeque<String>>>,
    /// Cancelled when stderr has been read to its end.
    closed: CancellationToken,
}

impl StderrTail {
    fn push(&self, line: String) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// The kept lines joined with " | ", or `None` if the plugin wrote nothing.
    pub fn summary(&self) -> Option<String> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        (!lines.is_empty()).then(|| lines.iter().cloned().collect::<Vec<_>>().join(" | "))
    }

    /// Waits (at most `max`) until everything the plugin wrote to stderr has been read, so
    /// that the last words of a process that just died are in the tail.
    pub async fn settle(&self, max: Duration) {
        let _ = tokio::time::timeout(max, self.closed.cancelled()).await;
    }
}

/// Reads `stderr` until it closes, logging each line under the plugin's name.
pub async fn drain(plugin: String, stderr: impl AsyncBufRead + Unpin, tail: StderrTail) {
    let _closed = tail.closed.clone().drop_guard();
    let mut stderr = stderr;
    let mut window_start = Instant::now();
    let mut logged = 0u32;
    let mut dropped = 0u64;
    loop {
        let line = match read_capped_line(&mut stderr).await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(error) => {
                tracing::debug!(plugin, %error, "reading the plugin's stderr failed");
                break;
            }
        };
        if window_start.elapsed() >= Duration::from_secs(60) {
            if dropped > 0 {
                tracing::warn!(target: "phi3d::plugin", plugin, dropped, "stderr lines not logged (too many)");
            }
            window_start = Instant::now();
            logged = 0;
            dropped = 0;
        }
        if logged < LINES_PER_MINUTE {
            logged += 1;
            tracing::info!(target: "phi3d::plugin", plugin, "{line}");
        } else {
            dropped += 1;
        }
        tail.push(line);
    }
}

/// One line, cut at [`MAX_LINE`] bytes with its remainder discarded as it streams by.
async fn read_capped_line(reader: &mut (impl AsyncBufRead + Unpin)) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut cut = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok((!line.is_empty() || cut).then(|| finish(line, cut)));
        }
        let newline = buf.iter().position(|&b| b == b'\n');
        let take = newline.unwrap_or(buf.len());
        let room = MAX_LINE.saturating_sub(line.len());
        line.extend_from_slice(&buf[..take.min(room)]);
        cut |= take > room;
        reader.consume(take + usize::from(newline.is_some()));
        if newline.is_some() {
            return Ok(Some(finish(line, cut)));
        }
    }
}

fn finish(line: Vec<u8>, cut: bool) -> String {
    let mut text = String::from_utf8_lossy(&line).trim_end().to_string();
    if cut {
        text.push_str(" [line cut]");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_cut_and_the_tail_kept() {
        let mut input = Vec::new();
        for i in 0..7 {
            input.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        input.extend(std::iter::repeat_n(b'x', 5000));
        input.extend_from_slice(b"\nlast without newline");
        let tail = StderrTail::default();
        drain("t".into(), tokio::io::BufReader::with_capacity(64, &input[..]), tail.clone()).await;
        tail.settle(Duration::ZERO).await;
        assert!(tail.closed.is_cancelled());
        let lines: Vec<String> = tail.lines.lock().unwrap().iter().cloned().collect();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines[2], "line 6");
        assert!(lines[3].ends_with(" [line cut]") && lines[3].len() == MAX_LINE + " [line cut]".len());
        assert_eq!(lines[4], "last without newline");
        assert!(tail.summary().unwrap().starts_with("line 4 | line 5"));
    }

    #[test]
    fn empty_tail_has_no_summary() {
        assert_eq!(StderrTail::default().summary(), None);
    }
}
