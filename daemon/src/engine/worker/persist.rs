//! The prompt cache across restarts, as the worker carries it out: at start-up the pinned
//! prefixes are restored from disk or decoded, and the saved entries restored while they fit
//! (into the entries' sequences, then the slots'); on the way out (and once a pinned prefix
//! was decoded) the cached sequences are saved: the pinned prefixes, the entries, the idle
//! slots' caches.
//! What a file holds and whether it may be loaded is [`crate::engine::cache_store`]'s; this is
//! the part that needs the llama context.

use std::time::{Duration, Instant, SystemTime};

use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::token::LlamaToken;

use super::{Pinned, Worker};
use crate::engine::cache_store::{self, CacheKey, CacheStore, SaveItem};
use crate::engine::loader::{EngineConfig, LoadError};
use crate::engine::ram_tier::RamEntry;

/// The store the config asks for; `None` when the cache is not to be saved.
pub(super) fn prompt_store(config: &EngineConfig) -> Option<CacheStore> {
    if config.prompt_cache_disk_bytes == 0 {
        return None;
    }
    let kv_type = config.kv_type.name();
    match CacheKey::new(&config.model_path, config.ctx_size, kv_type, config.slots) {
        Ok(key) => Some(CacheStore::new(config.prompt_cache_dir.clone(), key, config.prompt_cache_disk_bytes)),
        Err(err) => {
            tracing::warn!("the prompt cache will not be saved: cannot identify the model file: {err}");
            None
        }
    }
}

/// Where a saved cache is restored.
#[derive(Clone, Copy)]
enum Place {
    Entry(usize),
    Slot(usize),
}

impl Worker<'_> {
    /// Pinned prefixes first (restored from disk when saved, decoded otherwise), then the
    /// saved caches while they fit, most valuable first. A saved entry that cannot be
    /// used is dropped, never fatal; a pinned prompt that cannot be decoded is.
    pub(super) fn warm_cache(&mut self, config: &EngineConfig) -> Result<(), LoadError> {
        let started = Instant::now();
        let saved = self.store.as_ref().map(CacheStore::list).unwrap_or_default();
        self.entries_on_disk = saved.len();
        let (mut decoded_any, mut restored) = (false, 0);
        for (k, path) in config.pinned_prompts.iter().enumerate() {
            let text = std::fs::read_to_string(path).map_err(|err| {
                LoadError::WarmUp(format!("pinned prompt {}: {err}; fix the path in pinned_prompts", path.display()))
            })?;
            let tokens = (config.render_prefix)(self.model, &text)
                .map_err(|err| LoadError::WarmUp(format!("pinned prompt {}: {err}", path.display())))?;
            let pinned_so_far: usize = self.pinned.iter().map(|pinned| pinned.tokens.len()).sum();
            if pinned_so_far + tokens.len() >= self.n_ctx {
                return Err(LoadError::WarmUp(format!(
                    "pinned prompt {} is {} tokens; with the other pinned prompts ({pinned_so_far} tokens) it does \
                     not leave room in a context of {}; raise ctx_size or shorten it",
                    path.display(),
                    tokens.len(),
                    self.n_ctx
                )));
            }
            let seq_id = self.layout.pinned(k);
            let from_disk = saved
                .iter()
                .filter(|entry| entry.pinned && entry.tokens == tokens.len())
                .any(|entry| self.restore_entry(entry, seq_id, Some(&tokens)).is_some());
            if from_disk {
                restored += 1;
            } else {
                self.decode_pinned(config, path, seq_id, &tokens)?;
                decoded_any = true;
            }
            self.pinned.push(Pinned { seq_id, tokens });
        }
        // Into the entries first: they are what a new task copies from or takes.
        let mut places = (0..self.entries.len()).map(Place::Entry).chain((0..self.slots.len()).map(Place::Slot));
        let mut place = places.next();
        let mut kept_in_ram = 0;
        for entry in saved.iter().filter(|entry| !entry.pinned && entry.tokens > 0) {
            let Some(target) = place.filter(|_| self.free_cells() >= entry.tokens) else {
                // No sequence or no cells left for it: the RAM tier, while it has room.
                kept_in_ram += usize::from(self.keep_in_ram(entry));
                continue;
            };
            let seq_id = match target {
                Place::Entry(k) => self.entries[k].seq_id,
                Place::Slot(index) => self.slots[index].seq_id,
            };
            if let Some(tokens) = self.restore_entry(entry, seq_id, None) {
                let age = cache_store::unix_seconds(SystemTime::now()).saturating_sub(entry.last_used);
                // After a reboot the monotonic clock cannot go back that far: oldest first, then.
                let last_used = Instant::now().checked_sub(Duration::from_secs(age)).unwrap_or(self.started_at);
                match target {
                    Place::Entry(k) => {
                        self.entries[k].tokens = tokens;
                        self.entries[k].last_used = last_used;
                    }
                    Place::Slot(index) => {
                        self.slots[index].tokens = tokens;
                        self.slots[index].last_used = last_used;
                    }
                }
                place = places.next();
                restored += 1;
            }
        }
        if !saved.is_empty() {
            tracing::info!(
                found = saved.len(),
                restored,
                kept_in_ram,
                ms = started.elapsed().as_millis() as u64,
                "prompt cache restored"
            );
        }
        if decoded_any {
            self.save();
        }
        Ok(())
    }

    /// Loads one saved entry into `seq_id`; its tokens when llama.cpp took it and it holds
    /// exactly the positions the file says (and, for a pinned prefix, the expected tokens).
    fn restore_entry(
        &mut self,
        saved: &cache_store::Saved,
        seq_id: i32,
        expected: Option<&[LlamaToken]>,
    ) -> Option<Vec<LlamaToken>> {
        let entry = self.store.as_ref()?.read(saved)?;
        if expected.is_some_and(|expected| expected != entry.tokens.as_slice()) {
            return None;
        }
        // SAFETY: the bytes are what llama.cpp wrote for a context of this model, size, KV
        // type and build (the cache key), and their sha256 checked out.
        if !unsafe { self.load_state(seq_id, &entry.state, entry.tokens.len()) } {
            if let Some(store) = &self.store {
                store.reject(saved, "llama.cpp did not restore the positions its tokens say");
            }
            return None;
        }
        self.cells.append(seq_id, entry.tokens.len() as u32);
        Some(entry.tokens)
    }

    /// Reads one saved entry into the RAM tier, if it fits there; whether it was kept.
    fn keep_in_ram(&mut self, saved: &cache_store::Saved) -> bool {
        if self.ram.bytes() + saved.state_bytes + saved.tokens * 4 > self.ram.budget_bytes() {
            return false;
        }
        let Some(entry) = self.store.as_ref().and_then(|store| store.read(saved)) else { return false };
        let age = cache_store::unix_seconds(SystemTime::now()).saturating_sub(saved.last_used);
        let last_used = Instant::now().checked_sub(Duration::from_secs(age)).unwrap_or(self.started_at);
        self.ram.insert(RamEntry { tokens: entry.tokens, state: entry.state, last_used, hits: 0 })
    }

    fn decode_pinned(
        &mut self,
        config: &EngineConfig,
        path: &std::path::Path,
        seq_id: i32,
        tokens: &[LlamaToken],
    ) -> Result<(), LoadError> {
        let started = Instant::now();
        tracing::info!(file = %path.display(), tokens = tokens.len(), "warming a pinned prefix");
        for (chunk_index, chunk) in tokens.chunks(self.batch_size).enumerate() {
            if config.cancel.is_cancelled() {
                return Err(LoadError::Cancelled);
            }
            self.batch.clear();
            let start = chunk_index * self.batch_size;
            for (offset, token) in chunk.iter().enumerate() {
                self.batch
                    .add(*token, (start + offset) as i32, &[seq_id], false)
                    .map_err(|err| LoadError::WarmUp(err.to_string()))?;
            }
            self.ctx
                .decode(&mut self.batch)
                .map_err(|err| LoadError::WarmUp(format!("pinned prompt {}: {err}", path.display())))?;
            self.cells.append(seq_id, chunk.len() as u32);
        }
        tracing::info!(file = %path.display(), ms = started.elapsed().as_millis() as u64, "pinned prefix warm");
        Ok(())
    }

    /// Saves the pinned prefixes, the entries, the idle slots' cached sequences and the RAM
    /// tier for the next start.
    pub(super) fn save(&mut self) {
        let Some(store) = &self.store else { return };
        let started = Instant::now();
        let now = SystemTime::now();
        let flags = LlamaStateSeqFlags::empty();
        let mut items: Vec<SaveItem<Held>> = self
            .pinned
            .iter()
            .map(|pinned| SaveItem {
                source: Held::Sequence(pinned.seq_id),
                tokens: pinned.tokens.clone(),
                pinned: true,
                last_used: cache_store::unix_seconds(now),
                state_bytes: self.ctx.state_seq_get_size_ext(pinned.seq_id, flags),
            })
            .collect();
        let idle_slots = self
            .slots
            .iter()
            .filter(|slot| !slot.is_busy())
            .map(|slot| (Held::Sequence(slot.seq_id), &slot.tokens, slot.last_used));
        let entries = self.entries.iter().map(|entry| (Held::Sequence(entry.seq_id), &entry.tokens, entry.last_used));
        let in_ram = self.ram.entries().iter().enumerate().map(|(k, entry)| (Held::Ram(k), &entry.tokens, entry.last_used));
        let mut cached: Vec<_> =
            idle_slots.chain(entries).chain(in_ram).filter(|(_, tokens, _)| !tokens.is_empty()).collect();
        cached.sort_by_key(|(_, _, last_used)| std::cmp::Reverse(*last_used));
        for (source, tokens, last_used) in cached {
            // A sequence holding exactly what another one saved adds nothing.
            if items.iter().any(|item| item.tokens == *tokens) {
                continue;
            }
            let age = last_used.elapsed();
            let state_bytes = match source {
                Held::Sequence(seq_id) => self.ctx.state_seq_get_size_ext(seq_id, flags),
                Held::Ram(k) => self.ram.entries()[k].state.len(),
            };
            items.push(SaveItem {
                source,
                tokens: tokens.clone(),
                pinned: false,
                last_used: cache_store::unix_seconds(now.checked_sub(age).unwrap_or(now)),
                state_bytes,
            });
        }
        let saved = store.save(&items, |source| match *source {
            Held::Sequence(seq_id) => self.sequence_state(seq_id),
            Held::Ram(k) => self.ram.entries()[k].state.clone(),
        });
        match saved {
            Ok(saved) => {
                self.entries_on_disk = saved;
                tracing::info!(saved, ms = started.elapsed().as_millis() as u64, "prompt cache saved");
            }
            Err(err) => tracing::warn!("cannot save the prompt cache: {err}"),
        }
    }

    /// llama.cpp's serialised state of one sequence (its KV cells).
    pub(super) fn sequence_state(&self, seq: i32) -> Vec<u8> {
        let flags = LlamaStateSeqFlags::empty();
        let size = self.ctx.state_seq_get_size_ext(seq, flags);
        let mut bytes = vec![0u8; size];
        // SAFETY: the buffer holds the `size` bytes llama.cpp just said it needs.
        let written = unsafe { self.ctx.state_seq_get_data_ext(bytes.as_mut_ptr(), seq, flags) };
        bytes.truncate(written);
        bytes
    }

    /// Loads `state` into the empty sequence `seq_id`; true when llama.cpp took it and the
    /// sequence then holds exactly positions `0..tokens`. Otherwise the sequence is emptied.
    ///
    /// # Safety
    /// `state` must be what `state_seq_get_data` wrote for a context of this model, size, KV
    /// type and llama.cpp build.
    pub(super) unsafe fn load_state(&mut self, seq_id: i32, state: &[u8], tokens: usize) -> bool {
        // SAFETY: the caller vouches for the bytes.
        let loaded = unsafe { self.ctx.state_seq_set_data_ext(state, seq_id, LlamaStateSeqFlags::empty()) };
        let positions = (self.ctx.kv_cache_seq_pos_min(seq_id), self.ctx.kv_cache_seq_pos_max(seq_id));
        if loaded && positions == (0, tokens as i32 - 1) {
            return true;
        }
        self.remove_range(seq_id, 0, None);
        false
    }
}

/// Where a cached prompt to be saved is held.
#[derive(Clone, Copy)]
enum Held {
    Sequence(i32),
    /// The RAM tier's entry at this index.
    Ram(usize),
}
