//! A stand-in for systemd's notification socket: a datagram Unix socket whose path a test
//! passes to the daemon as `NOTIFY_SOCKET`, collecting every message the daemon sends.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct NotifySocket {
    pub path: PathBuf,
    /// Every datagram received so far, one string each (its lines are the assignments).
    messages: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    /// Binds the socket in a fresh folder and reads it on a thread of its own.
    pub fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        std::thread::spawn(move || {
            let mut buffer = vec![0u8; 65536];
            while let Ok(length) = socket.recv(&mut buffer) {
                sink.lock().unwrap().push(String::from_utf8_lossy(&buffer[..length]).into_owned());
            }
        });
        NotifySocket { path, messages, _dir: dir }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every message so far.
    pub fn messages(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }

    /// How many messages so far hold the line `assignment` (e.g. "WATCHDOG=1").
    pub fn count(&self, assignment: &str) -> usize {
        self.messages().iter().filter(|message| message.lines().any(|line| line == assignment)).count()
    }

    /// Waits until `count` messages hold a line starting with `prefix`; the first such message.
    pub async fn wait_for(&self, prefix: &str, count: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let matching: Vec<String> = self
                .messages()
                .into_iter()
                .filter(|message| message.lines().any(|line| line.starts_with(prefix)))
                .collect();
            if matching.len() >= count {
                return matching[0].clone();
            }
            assert!(Instant::now() < deadline, "no {count} messages with {prefix:?} within {timeout:?}: {:?}", self.messages());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
