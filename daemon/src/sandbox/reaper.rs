//! Plugins end with phi3d, however phi3d ends.
//!
//! A stopped plugin is killed as a whole process group ([`super::kill_group`]); a plugin's own
//! process has a parent-death signal (see `ChildSteps`), so it dies with phi3d even on SIGKILL.
//! What the plugin forked has no such signal (the kernel clears it on fork), so a small watcher,
//! `/bin/sh` reading a pipe from phi3d, keeps the list of live plugin process groups: phi3d
//! tells it of each group as it starts and when it is gone, and when the pipe closes (phi3d
//! exited, crashed or was SIGKILLed) the watcher kills every group still listed and exits.
//!
//! The watcher leads a process group of its own and ignores the signals a terminal or a service
//! manager sends to phi3d's group, so that it outlives phi3d for the moment it needs. Plugins
//! cannot leave their group (`setsid` and `setpgid` are denied by the seccomp filter).

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::Mutex;

/// Keeps `groups` (" 12 34 ") up to date from lines `+ PGID` / `- PGID`; on end of input
/// SIGKILLs them all.
const SCRIPT: &str = r#"trap '' INT TERM HUP QUIT PIPE
groups=' '
while read -r op id; do
  case "$op" in
    +) groups="$groups$id " ;;
    -) case "$groups" in *" $id "*) groups="${groups%% $id *} ${groups#* $id }" ;; esac ;;
  esac
done
for id in $groups; do kill -9 "-$id" 2>/dev/null; done
"#;

static WATCHER: Mutex<Option<Option<ChildStdin>>> = Mutex::new(None);

/// Lists the group `pgid` with the watcher (started on first use).
pub fn watch_group(pgid: i32) {
    send(&format!("+ {pgid}\n"));
}

/// Takes the group `pgid` off the watcher's list: it is gone, and its id may be reused.
pub fn forget_group(pgid: i32) {
    send(&format!("- {pgid}\n"));
}

fn send(line: &str) {
    let mut watcher = WATCHER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let stdin = watcher.get_or_insert_with(start);
    if let Some(pipe) = stdin
        && let Err(error) = pipe.write_all(line.as_bytes())
    {
        tracing::warn!(%error, "the plugin watcher is gone; plugins' children may outlive a crash of phi3d");
        *stdin = None;
    }
}

fn start() -> Option<ChildStdin> {
    let spawned = Command::new("/bin/sh")
        .arg("-c")
        .arg(SCRIPT)
        .env_clear()
        .env("PATH", super::DEFAULT_PATH)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
    match spawned {
        // Never waited for: it exits only once phi3d has closed the pipe, that is, exited.
        Ok(mut child) => child.stdin.take(),
        Err(error) => {
            tracing::warn!(%error, "cannot start the plugin watcher; plugins' children may outlive a crash of phi3d");
            None
        }
    }
}
