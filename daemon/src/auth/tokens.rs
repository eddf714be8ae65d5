//! Bearer tokens: the token file (names and SHA-256 digests, never the tokens themselves),
//! `phi3d token create / revoke / list`, and the daemon's check of a presented token.
//!
//! A token is 32 random bytes, so a plain SHA-256 digest is enough to store it: a slow
//! password hash protects guessable secrets, and nothing here is guessable. Comparing
//! digests rather than tokens also keeps the comparison's timing independent of the secret.
//!
//! The daemon re-reads the file when it changes (checked on each call, one `stat`), so a
//! revoked token stops working at once, without a restart. A file that cannot be read or
//! parsed any more lets nobody in until it is fixed: failing open would hand the daemon to the
//! network.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where tokens live unless configured.
pub const DEFAULT_TOKEN_FILE: &str = "/etc/phi3d/tokens.toml";

/// What every token starts with, so that a leaked one is recognisable (secret scanners,
/// logs) and a mistyped flag value is told apart from a token.
const TOKEN_PREFIX: &str = "phi3d_";

/// The token file's contents.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    #[serde(default, rename = "token")]
    pub tokens: Vec<TokenEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    /// RFC 3339, UTC.
    pub created: String,
    /// When it was revoked; kept so that its holder is told why it no longer works.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<String>,
}

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn now() -> String {
    jiff::Timestamp::now().round(jiff::Unit::Second).map(|now| now.to_string()).unwrap_or_default()
}

impl TokenFile {
    /// Reads the file; a missing one is empty.
    pub fn load(path: &Path) -> Result<TokenFile, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|err| format!("token file {}: {}", path.display(), err.message())),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(TokenFile::default()),
            Err(err) => Err(format!("token file {}: {err}", path.display())),
        }
    }

    /// Writes the file under a temporary name and renames it into place, keeping the mode and
    /// group of the file it replaces (0640 for a new one: root writes, the service's group
    /// reads).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let fail = |err: std::io::Error| format!("token file {}: {err}", path.display());
        let existing = std::fs::metadata(path).ok();
        let mode = existing.as_ref().map_or(0o640, |meta| meta.permissions().mode() & 0o7777);
        if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(fail)?;
        }
        let text = format!(
            "# phi3d access tokens: `phi3d token create|revoke|list` edits this file.\n\
             # Only SHA-256 digests are kept; a lost token cannot be recovered, only replaced.\n\n{}",
            toml::to_string(self).map_err(|err| format!("token file {}: {err}", path.display()))?
        );
        let temp = path.with_extension("toml.tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)
            .map_err(fail)?;
        file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(fail)?;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode)).map_err(fail)?;
        if let Some(meta) = existing {
            // Only root can give a file away; anyone else keeps their own group, as before.
            let _ = std::os::unix::fs::chown(&temp, Some(meta.uid()), Some(meta.gid()));
        }
        std::fs::rename(&temp, path).map_err(fail)
    }

    /// Adds a token named `name` and returns it: the only time it is ever shown.
    pub fn create(&mut self, name: &str) -> Result<String, String> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)) {
            return Err(format!("token name `{name}`: use letters, digits and - _ . @ only"));
        }
        if self.tokens.iter().any(|entry| entry.name == name && entry.revoked.is_none()) {
            return Err(format!("a token named `{name}` exists already; revoke it first or choose another name"));
        }
        self.tokens.retain(|entry| entry.name != name);
        let token = format!("{TOKEN_PREFIX}{}", hex::encode(rand::random::<[u8; 32]>()));
        self.tokens.push(TokenEntry { name: name.to_owned(), sha256: digest(&token), created: now(), revoked: None });
        Ok(token)
    }

    /// Marks the token named `name` revoked.
    pub fn revoke(&mut self, name: &str) -> Result<(), String> {
        match self.tokens.iter_mut().find(|entry| entry.name == name) {
            Some(entry) if entry.revoked.is_some() => Err(format!("token `{name}` is revoked already")),
            Some(entry) => {
                entry.revoked = Some(now());
                Ok(())
            }
            None => Err(format!("no token is named `{name}`; `phi3d token list` shows them")),
        }
    }

    /// The entry a presented token belongs to.
    fn find(&self, token: &str) -> Option<&TokenEntry> {
        let presented = digest(token);
        self.tokens.iter().find(|entry| entry.sha256 == presented)
    }
}

/// Why a presented token was turned away, phrased for the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejection {
    Missing,
    Unknown,
    Revoked { name: String, when: String },
    /// The daemon cannot read its token file; nobody gets in until it is fixed.
    Unreadable,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Missing => write!(
                f,
                "this phi3d requires a token: send `authorization: Bearer <token>` (phi3d's CLI: --token or \
                 PHI3D_TOKEN); an administrator creates one with `phi3d token create NAME`"
            ),
            Rejection::Unknown => write!(f, "the token is not valid for this phi3d; ask for a new one (`phi3d token create`)"),
            Rejection::Revoked { name, when } => {
                write!(f, "the token `{name}` was revoked at {when}; ask for a new one (`phi3d token create`)")
            }
            Rejection::Unreadable => {
                write!(f, "phi3d cannot read its token file, so no token is accepted; its log says why")
            }
        }
    }
}

/// The daemon's view of the token file, re-read whenever it changes on disk.
///
/// Tokens are required once the file has been seen, at start-up or later, and stay required
/// until phi3d restarts: creating the first token locks the daemon at once, and deleting the
/// file locks everyone out instead of opening the door.
pub struct TokenStore {
    path: PathBuf,
    state: Mutex<Loaded>,
}

struct Loaded {
    /// What the file looked like when read: modification time, size and inode.
    stamp: Option<(i64, i64, u64, u64)>,
    tokens: Result<TokenFile, String>,
    required: bool,
}

fn stamp(path: &Path) -> Option<(i64, i64, u64, u64)> {
    std::fs::metadata(path).ok().map(|meta| (meta.mtime(), meta.mtime_nsec(), meta.size(), meta.ino()))
}

impl TokenStore {
    /// Reads the file now, so that a broken one stops the daemon at start-up.
    pub fn open(path: PathBuf) -> Result<TokenStore, String> {
        let stamp = stamp(&path);
        let tokens = TokenFile::load(&path)?;
        let required = stamp.is_some();
        if required && tokens.tokens.iter().all(|entry| entry.revoked.is_some()) {
            tracing::warn!(path = %path.display(), "the token file holds no valid token: nobody can connect until `phi3d token create NAME`");
        }
        Ok(TokenStore { path, state: Mutex::new(Loaded { stamp, tokens: Ok(tokens), required }) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether callers need a token (the file exists, or existed since start-up).
    pub fn required(&self) -> bool {
        let mut state = self.state.lock().expect("token store lock");
        self.refresh(&mut state);
        state.required
    }

    /// The name of the token's owner (`None` when tokens are not in use), or why it is refused.
    pub fn check(&self, token: Option<&str>) -> Result<Option<String>, Rejection> {
        let mut state = self.state.lock().expect("token store lock");
        self.refresh(&mut state);
        if !state.required {
            return Ok(None);
        }
        let token = token.ok_or(Rejection::Missing)?;
        let file = state.tokens.as_ref().map_err(|_| Rejection::Unreadable)?;
        match file.find(token) {
            None => Err(Rejection::Unknown),
            Some(TokenEntry { name, revoked: Some(when), .. }) => {
                Err(Rejection::Revoked { name: name.clone(), when: when.clone() })
            }
            Some(entry) => Ok(Some(entry.name.clone())),
        }
    }

    fn refresh(&self, state: &mut Loaded) {
        let current = stamp(&self.path);
        if current == state.stamp {
            return;
        }
        state.stamp = current;
        if current.is_some() && !state.required {
            tracing::info!(path = %self.path.display(), "a token file appeared: every request needs a token from now on");
            state.required = true;
        }
        state.tokens = TokenFile::load(&self.path);
        match &state.tokens {
            Ok(file) => tracing::info!(path = %self.path.display(), tokens = file.tokens.len(), "token file re-read"),
            Err(err) => tracing::error!("{err}; no token is accepted until it is fixed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_tokens_are_checked_and_revocation_takes_effect_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let mut file = TokenFile::load(&path).unwrap();
        let token = file.create("homeassistant").unwrap();
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() == TOKEN_PREFIX.len() + 64);
        file.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&token[TOKEN_PREFIX.len()..]), "the token itself is never stored");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);

        let store = TokenStore::open(path.clone()).unwrap();
        assert!(store.required());
        assert_eq!(store.check(Some(&token)), Ok(Some("homeassistant".to_owned())));
        assert_eq!(store.check(None), Err(Rejection::Missing));
        assert_eq!(store.check(Some("phi3d_nope")), Err(Rejection::Unknown));

        let mut file = TokenFile::load(&path).unwrap();
        file.revoke("homeassistant").unwrap();
        file.save(&path).unwrap();
        assert!(matches!(store.check(Some(&token)), Err(Rejection::Revoked { name, .. }) if name == "homeassistant"));
    }

    #[test]
    fn names_are_unique_and_checked() {
        let mut file = TokenFile::default();
        file.create("a").unwrap();
        assert!(file.create("a").unwrap_err().contains("exists already"));
        assert!(file.create("with space").unwrap_err().contains("letters, digits"));
        assert!(file.revoke("b").unwrap_err().contains("no token is named `b`"));
        file.revoke("a").unwrap();
        assert!(file.revoke("a").unwrap_err().contains("revoked already"));
        let again = file.create("a").unwrap();
        assert_eq!(file.tokens.len(), 1, "a revoked name can be given a new token");
        assert!(file.find(&again).is_some_and(|entry| entry.revoked.is_none()));
    }

    #[test]
    fn tokens_are_required_from_the_moment_the_file_appears_and_stay_required() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let store = TokenStore::open(path.clone()).unwrap();
        assert!(!store.required());
        assert_eq!(store.check(None), Ok(None));
        let mut file = TokenFile::default();
        let token = file.create("a").unwrap();
        file.save(&path).unwrap();
        assert_eq!(store.check(None), Err(Rejection::Missing));
        assert_eq!(store.check(Some(&token)), Ok(Some("a".to_owned())));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(store.check(Some(&token)), Err(Rejection::Unknown), "a deleted file opens nothing");
    }

    #[test]
    fn a_broken_file_lets_nobody_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let mut file = TokenFile::default();
        let token = file.create("a").unwrap();
        file.save(&path).unwrap();
        let store = TokenStore::open(path.clone()).unwrap();
        assert!(store.check(Some(&token)).is_ok());
        std::fs::write(&path, "[[token]]\nname = \n").unwrap();
        assert_eq!(store.check(Some(&token)), Err(Rejection::Unreadable));
        assert!(TokenStore::open(path).is_err(), "a broken file stops the start");
    }
}
