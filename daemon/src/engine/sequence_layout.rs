//! Which sequence of the one KV cache is what; the context is created with room for them all.

/// The sequences of the one KV cache: the slots, one scratch sequence per slot (where chunks
/// reused past a changed span wait, see the worker's `placement`), the pinned prefixes, the entries.
pub struct SequenceLayout {
    slots: u32,
    pinned: u32,
    entries: u32,
}

impl SequenceLayout {
    pub fn new(slots: u32, pinned: usize, entries: u32) -> SequenceLayout {
        SequenceLayout { slots, pinned: pinned as u32, entries }
    }

    /// Every sequence the context must allow.
    pub fn count(&self) -> u32 {
        2 * self.slots + self.pinned + self.entries
    }

    pub fn pinned(&self, k: usize) -> i32 {
        (2 * self.slots as usize + k) as i32
    }

    pub fn entries(&self) -> impl Iterator<Item = i32> {
        let first = 2 * self.slots + self.pinned;
        (first..first + self.entries).map(|seq| seq as i32)
    }
}
