//! How many KV cache cells are in use, counting a prefix shared by several sequences once.
//!
//! With the unified KV cache, `copy_kv_cache_seq` does not copy cells: it adds the destination
//! sequence to the source's cells. llama.cpp offers no count of used cells, and admission
//! needs one (a prompt waits rather than fail when the cells it needs are taken), so the
//! worker mirrors what it asks of the cache here.
//!
//! Model: every run of cells written by one decode lineage is a *group*. A sequence holds a
//! list of extents, each a range of positions within one group. Appending extends the
//! sequence's own open group; a copy shares the source's groups up to the copied length; a
//! truncation ends the sequence's claim on the positions it removed (and closes its group to
//! further appends, since new cells at those positions are not the ones others still hold).
//! The cells in use are, per group, the union of the ranges that sequences hold.

use std::collections::HashMap;

/// Positions `start..end` of one group held by one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    group: u64,
    start: u32,
    end: u32,
}

#[derive(Debug, Default)]
pub struct CellLedger {
    next_group: u64,
    sequences: HashMap<i32, Sequence>,
}

#[derive(Debug, Default, Clone)]
struct Sequence {
    extents: Vec<Extent>,
    /// The group this sequence created and may still extend.
    open_group: Option<u64>,
}

impl CellLedger {
    /// Records `count` new tokens decoded at the end of `seq`.
    pub fn append(&mut self, seq: i32, count: u32) {
        if count == 0 {
            return;
        }
        let next_group = &mut self.next_group;
        let sequence = self.sequences.entry(seq).or_default();
        let end = sequence.extents.last().map_or(0, |extent| extent.end);
        match (sequence.open_group, sequence.extents.last_mut()) {
            (Some(open), Some(last)) if last.group == open => last.end += count,
            _ => {
                let group = *next_group;
                *next_group += 1;
                sequence.open_group = Some(group);
                sequence.extents.push(Extent { group, start: end, end: end + count });
            }
        }
    }

    /// Records that `seq` keeps only its first `keep` positions.
    pub fn truncate(&mut self, seq: i32, keep: u32) {
        let Some(sequence) = self.sequences.get_mut(&seq) else { return };
        let before = sequence.extents.last().map_or(0, |extent| extent.end);
        if keep >= before {
            return;
        }
        sequence.extents.retain_mut(|extent| {
            extent.end = extent.end.min(keep);
            extent.start < extent.end
        });
        sequence.open_group = None;
        if sequence.extents.is_empty() {
            self.sequences.remove(&seq);
        }
    }

    /// Records that `dst` (emptied first) now shares the first `len` positions of `src`.
    pub fn copy_prefix(&mut self, src: i32, dst: i32, len: u32) {
        self.sequences.remove(&dst);
        let Some(source) = self.sequences.get(&src) else { return };
        let extents: Vec<Extent> = source
            .extents
            .iter()
            .filter(|extent| extent.start < len)
            .map(|extent| Extent { end: extent.end.min(len), ..*extent })
            .collect();
        if !extents.is_empty() {
            self.sequences.insert(dst, Sequence { extents, open_group: None });
        }
    }

    /// Cells in use: per group, the union of the positions held (all ranges of one group start
    /// at the group's first position, so the union is its longest range).
    pub fn used(&self) -> u32 {
        let mut spans: HashMap<u64, (u32, u32)> = HashMap::new();
        for extent in self.sequences.values().flat_map(|sequence| &sequence.extents) {
            let span = spans.entry(extent.group).or_insert((extent.start, extent.end));
            span.0 = span.0.min(extent.start);
            span.1 = span.1.max(extent.end);
        }
        spans.values().map(|(start, end)| end - start).sum()
    }

    /// Cells that only `seq` holds: what removing it would free.
    pub fn exclusive(&self, seq: i32) -> u32 {
        if !self.sequences.contains_key(&seq) {
            return 0;
        }
        let mut without = CellLedger { next_group: self.next_group, sequences: self.sequences.clone() };
        without.sequences.remove(&seq);
        self.used() - without.used()
    }
}

#[cfg(test)]
mod tests {
    use super::CellLedger;

    #[test]
    fn appends_count_once_per_position() {
        let mut ledger = CellLedger::default();
        ledger.append(0, 100);
        ledger.append(0, 5);
        ledger.append(1, 20);
        assert_eq!(ledger.used(), 125);
    }

    #[test]
    fn a_copied_prefix_costs_nothing_until_the_copy_grows() {
        let mut ledger = CellLedger::default();
        ledger.append(0, 900);
        ledger.copy_prefix(0, 1, 900);
        assert_eq!(ledger.used(), 900);
        ledger.append(1, 50);
        ledger.append(0, 30);
        assert_eq!(ledger.used(), 980, "both grow on their own cells past the shared prefix");
        assert_eq!(ledger.exclusive(1), 50);
        assert_eq!(ledger.exclusive(0), 30);
    }

    #[test]
    fn truncating_frees_only_what_nobody_else_holds() {
        let mut ledger = CellLedger::default();
        ledger.append(0, 100);
        ledger.copy_prefix(0, 1, 60);
        ledger.truncate(0, 0);
        assert_eq!(ledger.used(), 60, "the copy keeps its 60 cells alive");
        ledger.truncate(1, 10);
        assert_eq!(ledger.used(), 10);
    }

    #[test]
    fn appending_after_a_truncation_writes_new_cells() {
        let mut ledger = CellLedger::default();
        ledger.append(0, 100);
        ledger.copy_prefix(0, 1, 100);
        ledger.truncate(0, 50);
        ledger.append(0, 50);
        assert_eq!(ledger.used(), 150, "positions 50..100 now exist twice: the copy's and the new ones");
    }

    #[test]
    fn copying_over_a_sequence_replaces_it() {
        let mut ledger = CellLedger::default();
        ledger.append(0, 10);
        ledger.append(1, 40);
        ledger.copy_prefix(0, 1, 10);
        assert_eq!(ledger.used(), 10);
    }
}
