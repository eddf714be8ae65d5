//! The MCP stdio transport to one plugin, hardened against a hostile peer.
//!
//! rmcp's own stdio transport is written for cooperative servers: it skips lines that are not
//! JSON and drops over-long lines, leaving the request they answered waiting forever. A
//! plugin is untrusted, so here every line is read with a hard cap on its length (a plugin
//! printing gigabytes without a newline costs at most the cap in memory), and anything that
//! is not JSON-RPC ends the connection with a [`Fault`] saying why. The caller watches that
//! fault and treats the plugin as crashed.
//!
//! Messages are newline-delimited JSON, as the MCP stdio transport specifies.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use rmcp::RoleClient;
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::Transport;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// The first reason a plugin's connection ended badly, shared between the transport, the
/// child-process watcher and the callers waiting on it.
#[derive(Debug, Clone, Default)]
pub struct Fault {
    reason: Arc<Mutex<Option<(Instant, String)>>>,
    /// Cancelled once the plugin is unusable, for whatever reason.
    dead: CancellationToken,
}

impl Fault {
    /// Records why the plugin is unusable (the first reason wins) and wakes every waiter.
    pub fn set(&self, reason: impl Into<String>) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some((Instant::now(), reason.into()));
        }
        drop(slot);
        self.dead.cancel();
    }

    pub fn reason(&self) -> Option<String> {
        self.get().map(|(_, reason)| reason)
    }

    /// When and why, if the fault is set.
    pub fn get(&self) -> Option<(Instant, String)> {
        self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_set(&self) -> bool {
        self.dead.is_cancelled()
    }

    /// Resolves once [`Fault::set`] was called.
    pub async fn wait(&self) {
        self.dead.cancelled().await
    }
}

/// A [`Transport`] over a plugin's stdout (`R`) and stdin (`W`).
pub struct StdioTransport<R, W> {
    reader: R,
    writer: Arc<tokio::sync::Mutex<Option<W>>>,
    max_line_bytes: usize,
    line: Vec<u8>,
    fault: Fault,
}

impl<R, W> StdioTransport<R, W>
where
    R: AsyncBufRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    pub fn new(reader: R, writer: W, max_line_bytes: usize, fault: Fault) -> Self {
        StdioTransport {
            reader,
            writer: Arc::new(tokio::sync::Mutex::new(Some(writer))),
            max_line_bytes,
            line: Vec::new(),
            fault,
        }
    }

    /// Reads one line into `self.line` (without its newline). `Ok(false)` is a clean end of
    /// stream. Cancel-safe: a partial line stays in `self.line` for the next call, which
    /// matters because rmcp polls `receive` inside a `select!`.
    async fn read_line(&mut self) -> Result<bool, String> {
        loop {
            let buf = self.reader.fill_buf().await.map_err(|e| format!("reading its output failed: {e}"))?;
            if buf.is_empty() {
                return Ok(false);
            }
            let newline = buf.iter().position(|&b| b == b'\n');
            let take = newline.unwrap_or(buf.len());
            if self.line.len() + take > self.max_line_bytes {
                return Err(format!("it sent a message longer than {} bytes", self.max_line_bytes));
            }
            self.line.extend_from_slice(&buf[..take]);
            self.reader.consume(take + usize::from(newline.is_some()));
            if newline.is_some() {
                return Ok(true);
            }
        }
    }

    fn parse(line: &[u8]) -> Result<Option<ServerJsonRpcMessage>, String> {
        match serde_json::from_slice::<ServerJsonRpcMessage>(line) {
            Ok(message) => Ok(Some(message)),
            Err(error) => {
                // Notifications outside MCP (a vendor's own) are allowed to pass unnoticed,
                // as the MCP SDKs do; anything else is a broken peer.
                if let Ok(value) = serde_json::from_slice::<serde_json::Value>(line)
                    && value.get("jsonrpc").and_then(|v| v.as_str()) == Some("2.0")
                    && value.get("id").is_none()
                    && value.get("method").is_some_and(|m| m.is_string())
                {
                    tracing::debug!(%value, "ignoring a notification phi3d does not know");
                    return Ok(None);
                }
                let start = String::from_utf8_lossy(&line[..line.len().min(120)]).into_owned();
                Err(format!("it sent malformed JSON-RPC ({error}): {start:?}"))
            }
        }
    }
}

impl<R, W> Transport<RoleClient> for StdioTransport<R, W>
where
    R: AsyncBufRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    type Error = std::io::Error;

    fn send(&mut self, item: ClientJsonRpcMessage) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        let writer = self.writer.clone();
        async move {
            let mut bytes = serde_json::to_vec(&item)?;
            bytes.push(b'\n');
            let mut writer = writer.lock().await;
            let Some(writer) = writer.as_mut() else {
                return Err(std::io::Error::new(std::io::ErrorKind::NotConnected, "the plugin's stdin is closed"));
            };
            writer.write_all(&bytes).await?;
            writer.flush().await
        }
    }

    async fn receive(&mut self) -> Option<ServerJsonRpcMessage> {
        loop {
            if self.fault.is_set() {
                return None;
            }
            let outcome = match self.read_line().await {
                Ok(true) => {
                    let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
                    let parsed = if line.iter().all(u8::is_ascii_whitespace) { Ok(None) } else { Self::parse(line) };
                    self.line.clear();
                    parsed
                }
                // A clean end of output: the process watcher reports how it exited.
                Ok(false) => return None,
                Err(reason) => Err(reason),
            };
            match outcome {
                Ok(Some(message)) => return Some(message),
                Ok(None) => continue,
                Err(reason) => {
                    self.fault.set(reason);
                    return None;
                }
            }
        }
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        // Dropping stdin tells a well-behaved plugin to exit.
        self.writer.lock().await.take();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    fn transport(
        input: &'static [u8],
        max: usize,
    ) -> (StdioTransport<BufReader<&'static [u8]>, tokio::io::Sink>, Fault) {
        let fault = Fault::default();
        let t = StdioTransport::new(BufReader::with_capacity(8, input), tokio::io::sink(), max, fault.clone());
        (t, fault)
    }

    #[tokio::test]
    async fn reads_messages_and_tolerates_blank_lines_and_vendor_notifications() {
        let input =
            b"\n{\"jsonrpc\":\"2.0\",\"method\":\"vendor/hello\"}\r\n{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\r\n";
        let (mut t, fault) = transport(input, 1024);
        let mut messages = Vec::new();
        while let Some(message) = t.receive().await {
            messages.push(message);
        }
        assert!(matches!(messages.last(), Some(ServerJsonRpcMessage::Response(_))), "{messages:?}");
        assert!(!fault.is_set(), "a clean end of stream is no fault");
    }

    #[tokio::test]
    async fn malformed_output_is_a_fault() {
        let (mut t, fault) = transport(b"hello world\n{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n", 1024);
        assert!(t.receive().await.is_none());
        let reason = fault.reason().unwrap();
        assert!(reason.contains("malformed JSON-RPC") && reason.contains("hello world"), "{reason}");
        // Once faulted, nothing more is read.
        assert!(t.receive().await.is_none());
    }

    #[tokio::test]
    async fn over_long_lines_are_a_fault_without_buffering_them() {
        let (mut t, fault) = transport(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"x\":\"0123456789\"}}\n", 20);
        assert!(t.receive().await.is_none());
        assert!(fault.reason().unwrap().contains("longer than 20 bytes"));
        assert!(t.line.len() <= 20);
    }

    #[tokio::test]
    async fn first_fault_wins() {
        let fault = Fault::default();
        fault.set("first");
        fault.set("second");
        fault.wait().await;
        assert_eq!(fault.reason().as_deref(), Some("first"));
    }
}
