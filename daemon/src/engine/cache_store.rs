//! The prompt cache on disk, so that a restart does not re-read every long prefix.
//!
//! On shutdown, and once a pinned prefix is warmed, the worker saves the cached sequences
//! (their tokens and llama.cpp's sequence state) into `prompt_cache_dir`, one file each,
//! written to a temporary name and renamed, most valuable first (pinned, then most recently
//! used) until `prompt_cache_disk_mb` is reached. Every file carries a key naming the model
//! (size, modification time and a hash of its first MiB), the context configuration and the
//! llama.cpp build; on start-up only files with this key are restored. A file of another
//! model or configuration, or a truncated or corrupt one (checked by its sha256 before
//! llama.cpp sees a byte), is removed with one log line.
//!
//! File layout: the magic line, one JSON header line, the tokens (little-endian i32), the
//! state bytes.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use llama_cpp_2::token::LlamaToken;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const MAGIC: &[u8] = b"phi3d-prompt-cache 1\n";
const EXTENSION: &str = "kv";

/// What must match for a saved state to be loaded into this context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKey {
    pub model_size: u64,
    pub model_modified_ns: u128,
    pub model_header_sha256: String,
    pub ctx_size: u32,
    pub kv_type: String,
    pub slots: u32,
    pub llama_cpp: String,
}

impl CacheKey {
    /// The key for `model_path` under this configuration.
    pub fn new(model_path: &Path, ctx_size: u32, kv_type: &str, slots: u32) -> std::io::Result<CacheKey> {
        let meta = std::fs::metadata(model_path)?;
        let modified = meta.modified()?.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_nanos());
        let mut head = Vec::with_capacity(1 << 20);
        std::fs::File::open(model_path)?.take(1 << 20).read_to_end(&mut head)?;
        Ok(CacheKey {
            model_size: meta.len(),
            model_modified_ns: modified,
            model_header_sha256: hex::encode(Sha256::digest(&head)),
            ctx_size,
            kv_type: kv_type.to_owned(),
            slots,
            llama_cpp: llama_cpp_build(),
        })
    }

    /// A short name for this key's files.
    fn file_prefix(&self) -> String {
        let text = serde_json::to_string(self).expect("a key serialises");
        hex::encode(&Sha256::digest(text.as_bytes())[..8])
    }
}

/// llama.cpp's version as llama-cpp-sys-2 builds it, plus the CPU features it was compiled
/// for: a state saved by another build may not load.
fn llama_cpp_build() -> String {
    format!("llama-cpp-sys-2 {}; {}", crate::engine::LLAMA_CPP_SYS_VERSION, crate::engine::cpu_features())
}

/// One cached sequence, as saved.
pub struct Entry {
    pub tokens: Vec<LlamaToken>,
    pub state: Vec<u8>,
    pub pinned: bool,
    /// Seconds since the epoch; the most recent are restored first.
    pub last_used: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    key: CacheKey,
    tokens: usize,
    state_bytes: usize,
    sha256: String,
    pinned: bool,
    last_used: u64,
}

pub struct CacheStore {
    dir: PathBuf,
    key: CacheKey,
    budget_bytes: u64,
}

impl CacheStore {
    pub fn new(dir: PathBuf, key: CacheKey, budget_bytes: u64) -> CacheStore {
        CacheStore { dir, key, budget_bytes }
    }

    /// Saves the sequences in `items` (most valuable first) within the disk budget, one at a
    /// time (`state` serialises one sequence; only what fits is ever serialised), and removes
    /// this key's older files. Returns how many were saved.
    pub fn save<S>(&self, items: &[SaveItem<S>], mut state: impl FnMut(&S) -> Vec<u8>) -> std::io::Result<usize> {
        use std::os::unix::fs::DirBuilderExt;
        // Prompts are the users' words: readable by phi3d alone.
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir)?;
        let prefix = self.key.file_prefix();
        let mut used = 0u64;
        let mut saved = Vec::new();
        for item in items {
            let size = (item.tokens.len() * 4 + item.state_bytes) as u64;
            if used.saturating_add(size) > self.budget_bytes {
                tracing::info!(
                    tokens = item.tokens.len(),
                    "prompt cache entry not saved: prompt_cache_disk_mb would be exceeded"
                );
                continue;
            }
            let entry = Entry { tokens: item.tokens.clone(), state: state(&item.source), pinned: item.pinned, last_used: item.last_used };
            let name = format!("{prefix}-{}.{EXTENSION}", saved.len());
            self.write(&self.dir.join(&name), &entry)?;
            used += size;
            saved.push(name);
        }
        for stale in self.files()? {
            let name = stale.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
            if name.starts_with(&prefix) && !saved.contains(&name) {
                let _ = std::fs::remove_file(&stale);
            }
        }
        Ok(saved.len())
    }

    fn write(&self, path: &Path, entry: &Entry) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let token_bytes: Vec<u8> = entry.tokens.iter().flat_map(|token| token.0.to_le_bytes()).collect();
        let mut hasher = Sha256::new();
        hasher.update(&token_bytes);
        hasher.update(&entry.state);
        let header = Header {
            key: self.key.clone(),
            tokens: entry.tokens.len(),
            state_bytes: entry.state.len(),
            sha256: hex::encode(hasher.finalize()),
            pinned: entry.pinned,
            last_used: entry.last_used,
        };
        let temporary = path.with_extension("tmp");
        let file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temporary)?;
        let mut file = std::io::BufWriter::new(file);
        file.write_all(MAGIC)?;
        serde_json::to_writer(&mut file, &header)?;
        file.write_all(b"\n")?;
        file.write_all(&token_bytes)?;
        file.write_all(&entry.state)?;
        file.into_inner().map_err(|err| err.into_error())?.sync_all()?;
        std::fs::rename(&temporary, path)
    }

    /// This key's saved entries (their headers only), most valuable first. Files that do not
    /// belong (another model or configuration) or whose size does not match their header are
    /// removed, each with one log line.
    pub fn list(&self) -> Vec<Saved> {
        let mut saved = Vec::new();
        for path in self.files().unwrap_or_default() {
            match self.header(&path) {
                Ok((header, body_offset)) => saved.push(Saved {
                    path,
                    body_offset,
                    tokens: header.tokens,
                    state_bytes: header.state_bytes,
                    sha256: header.sha256,
                    pinned: header.pinned,
                    last_used: header.last_used,
                }),
                Err(reason) => discard(&path, &reason),
            }
        }
        saved.sort_by_key(|entry| (!entry.pinned, std::cmp::Reverse(entry.last_used)));
        saved
    }

    /// One entry's tokens and state, checked against its sha256; a file that does not check
    /// out is removed.
    pub fn read(&self, saved: &Saved) -> Option<Entry> {
        let result = (|| -> Result<Entry, String> {
            let mut file = std::fs::File::open(&saved.path).map_err(|err| err.to_string())?;
            use std::io::Seek;
            file.seek(std::io::SeekFrom::Start(saved.body_offset)).map_err(|err| err.to_string())?;
            let mut body = Vec::with_capacity(saved.tokens * 4 + saved.state_bytes);
            file.read_to_end(&mut body).map_err(|err| err.to_string())?;
            if body.len() != saved.tokens * 4 + saved.state_bytes {
                return Err("truncated while reading".into());
            }
            if hex::encode(Sha256::digest(&body)) != saved.sha256 {
                return Err("checksum mismatch (corrupt file)".into());
            }
            let state = body.split_off(saved.tokens * 4);
            let tokens = body
                .chunks_exact(4)
                .map(|chunk| LlamaToken(i32::from_le_bytes(chunk.try_into().expect("chunks of four"))))
                .collect();
            Ok(Entry { tokens, state, pinned: saved.pinned, last_used: saved.last_used })
        })();
        result.map_err(|reason| discard(&saved.path, &reason)).ok()
    }

    /// Removes a file the worker could not use.
    pub fn reject(&self, saved: &Saved, reason: &str) {
        discard(&saved.path, reason);
    }

    fn files(&self) -> std::io::Result<Vec<PathBuf>> {
        match std::fs::read_dir(&self.dir) {
            Ok(dir) => Ok(dir
                .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                .filter(|path| path.extension().is_some_and(|ext| ext == EXTENSION))
                .collect()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(err) => Err(err),
        }
    }

    /// The header of `path` and where its body starts, with the file's size checked.
    fn header(&self, path: &Path) -> Result<(Header, u64), String> {
        let file = std::fs::File::open(path).map_err(|err| err.to_string())?;
        let length = file.metadata().map_err(|err| err.to_string())?.len();
        let mut head = Vec::new();
        // The header is a line of a few hundred bytes; a file without one in 64 KiB is not ours.
        file.take(64 * 1024).read_to_end(&mut head).map_err(|err| err.to_string())?;
        let rest = head.strip_prefix(MAGIC).ok_or("not a phi3d prompt cache file")?;
        let newline = rest.iter().position(|byte| *byte == b'\n').ok_or("truncated header")?;
        let header: Header =
            serde_json::from_slice(&rest[..newline]).map_err(|err| format!("unreadable header: {err}"))?;
        if header.key != self.key {
            return Err("saved for another model, configuration or llama.cpp build".into());
        }
        let body_offset = (MAGIC.len() + newline + 1) as u64;
        let expected = header
            .tokens
            .checked_mul(4)
            .and_then(|bytes| bytes.checked_add(header.state_bytes))
            .and_then(|bytes| (bytes as u64).checked_add(body_offset))
            .ok_or("corrupt header")?;
        if length != expected {
            return Err(format!("truncated or padded: {length} bytes, {expected} expected"));
        }
        Ok((header, body_offset))
    }
}

fn discard(path: &Path, reason: &str) {
    tracing::warn!(file = %path.display(), "prompt cache file ignored and removed: {reason}");
    let _ = std::fs::remove_file(path);
}

/// A saved entry, known by its header.
pub struct Saved {
    path: PathBuf,
    body_offset: u64,
    pub tokens: usize,
    pub state_bytes: usize,
    sha256: String,
    pub pinned: bool,
    pub last_used: u64,
}

/// A sequence to save.
pub struct SaveItem<S> {
    /// Where its state is: what `save`'s `state` serialises.
    pub source: S,
    pub tokens: Vec<LlamaToken>,
    pub pinned: bool,
    pub last_used: u64,
    /// What llama.cpp says the sequence's state takes, checked against the budget before it
    /// is serialised.
    pub state_bytes: usize,
}

pub fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ctx_size: u32) -> CacheKey {
        CacheKey {
            model_size: 1,
            model_modified_ns: 2,
            model_header_sha256: "ab".into(),
            ctx_size,
            kv_type: "f16".into(),
            slots: 2,
            llama_cpp: "test".into(),
        }
    }

    fn item(seq_id: i32, tokens: &[i32], pinned: bool, last_used: u64) -> SaveItem<i32> {
        SaveItem { source: seq_id, tokens: tokens.iter().copied().map(LlamaToken).collect(), pinned, last_used, state_bytes: 100 }
    }

    fn state(seq_id: &i32) -> Vec<u8> {
        vec![*seq_id as u8; 100]
    }

    fn load(store: &CacheStore) -> Vec<Entry> {
        store.list().iter().filter_map(|saved| store.read(saved)).collect()
    }

    #[test]
    fn entries_round_trip_pinned_and_recent_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = CacheStore::new(dir.path().into(), key(4096), 1 << 20);
        let items = [item(0, &[1, 2], false, 10), item(1, &[3], true, 5), item(2, &[4], false, 20)];
        assert_eq!(store.save(&items, state).unwrap(), 3);
        let loaded = load(&store);
        let firsts: Vec<i32> = loaded.iter().map(|entry| entry.tokens[0].0).collect();
        assert_eq!(firsts, [3, 4, 1]);
        assert_eq!(loaded[2].tokens.len(), 2);
        assert_eq!(loaded[0].state, vec![1; 100]);
        assert_eq!(store.list().len(), 3);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&store.files().unwrap()[0]).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "only phi3d reads the users' prompts: {mode:o}");
    }

    #[test]
    fn the_disk_budget_bounds_what_is_serialised_and_saved_and_old_files_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = CacheStore::new(dir.path().into(), key(4096), 250);
        let mut serialised = Vec::new();
        let items = [item(0, &[1], true, 1), item(1, &[2], false, 2), item(2, &[3], false, 3)];
        let saved = store.save(&items, |seq| {
            serialised.push(*seq);
            state(seq)
        });
        assert_eq!(saved.unwrap(), 2);
        assert_eq!(serialised, [0, 1], "the third was never serialised");
        assert_eq!(store.save(&[item(9, &[9], false, 9)], state).unwrap(), 1);
        assert_eq!(store.list().len(), 1, "files of an earlier save that were not saved again are removed");
    }

    #[test]
    fn another_configuration_or_a_corrupt_file_is_removed_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        CacheStore::new(dir.path().into(), key(2048), 1 << 20).save(&[item(0, &[1], false, 1)], state).unwrap();
        let store = CacheStore::new(dir.path().into(), key(4096), 1 << 20);
        store.save(&[item(0, &[2], false, 1), item(1, &[3], false, 1), item(2, &[4], false, 1)], state).unwrap();
        assert_eq!(store.files().unwrap().len(), 4);
        let ours: Vec<PathBuf> = store.list().iter().map(|saved| saved.path.clone()).collect();
        assert_eq!(ours.len(), 3, "the other configuration's file is gone");
        // Corrupt one in its state bytes, truncate another, and make the third lie about its size.
        let mut bytes = std::fs::read(&ours[0]).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&ours[0], &bytes).unwrap();
        let bytes = std::fs::read(&ours[1]).unwrap();
        std::fs::write(&ours[1], &bytes[..bytes.len() - 10]).unwrap();
        let text = String::from_utf8_lossy(&std::fs::read(&ours[2]).unwrap()).into_owned();
        let huge = text.replacen("\"tokens\":1", "\"tokens\":2305843009213693952", 1);
        std::fs::write(&ours[2], huge.as_bytes()).unwrap();
        assert!(load(&store).is_empty());
        assert!(store.files().unwrap().is_empty(), "every file that did not check out was removed");
    }
}
