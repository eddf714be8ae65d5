//! How many KV cache cells are in use, counting cells shared by several sequences once.
//!
//! With the unified KV cache, `copy_kv_cache_seq` does not copy cells: it adds the destination
//! sequence to the source's cells, and `kv_cache_seq_add` moves cells to other positions
//! without copying them either. llama.cpp offers no count of used cells, and admission needs
//! one (a prompt waits rather than fail when the cells it needs are taken), so the worker
//! mirrors what it asks of the cache here.
//!
//! Model: every run of cells written by one decode lineage is a *group*, its cells numbered in
//! the order they were written. A sequence holds, position by position, a list of extents,
//! each a run of cells of one group. Appending extends the sequence's own open group; a copy
//! shares the source's extents up to the copied length; a truncation ends the sequence's claim
//! on the positions it removed (and closes its group to further appends, since new cells at
//! those positions are not the ones others still hold). Reuse past a changed span *parks* runs
//! of a sequence's cells (moved aside to their new positions) and hands them back as the
//! decode reaches them. The cells in use are, per group, the union of the runs held.

use std::collections::{HashMap, VecDeque};

/// Cells `first..first + len` of one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    group: u64,
    first: u32,
    len: u32,
}

impl Extent {
    fn end(&self) -> u32 {
        self.first + self.len
    }
}

/// Appends `extent`, merged into the last one where it continues it: a sequence pieced
/// together from chunks stays a short list.
fn push_merged(extents: &mut Vec<Extent>, extent: Extent) {
    match extents.last_mut() {
        Some(last) if last.group == extent.group && last.end() == extent.first => last.len += extent.len,
        _ => extents.push(extent),
    }
}

#[derive(Debug, Default)]
pub struct CellLedger {
    next_group: u64,
    sequences: HashMap<i32, Sequence>,
    /// Runs moved aside for a sequence, in the order it takes them back.
    parked: HashMap<i32, VecDeque<Extent>>,
}

#[derive(Debug, Default, Clone)]
struct Sequence {
    /// In position order: the first extent holds positions `0..len`, and so on.
    extents: Vec<Extent>,
    /// The group this sequence created and may still extend.
    open_group: Option<u64>,
}

impl Sequence {
    fn len(&self) -> u32 {
        self.extents.iter().map(|extent| extent.len).sum()
    }

    /// The extents holding positions `start..end`, cut to them.
    fn slice(&self, start: u32, end: u32) -> Vec<Extent> {
        let mut position = 0;
        let mut out = Vec::new();
        for extent in &self.extents {
            let (from, to) = (position, position + extent.len);
            position = to;
            let (cut_from, cut_to) = (from.max(start), to.min(end));
            if cut_from < cut_to {
                let cut = Extent { group: extent.group, first: extent.first + (cut_from - from), len: cut_to - cut_from };
                push_merged(&mut out, cut);
            }
        }
        out
    }
}

impl CellLedger {
    /// Records `count` new tokens decoded at the end of `seq`.
    pub fn append(&mut self, seq: i32, count: u32) {
        if count == 0 {
            return;
        }
        let next_group = &mut self.next_group;
        let sequence = self.sequences.entry(seq).or_default();
        match (sequence.open_group, sequence.extents.last_mut()) {
            (Some(open), Some(last)) if last.group == open => last.len += count,
            _ => {
                let group = *next_group;
                *next_group += 1;
                sequence.open_group = Some(group);
                sequence.extents.push(Extent { group, first: 0, len: count });
            }
        }
    }

    /// Records that `seq` keeps only its first `keep` positions.
    pub fn truncate(&mut self, seq: i32, keep: u32) {
        let Some(sequence) = self.sequences.get_mut(&seq) else { return };
        if keep >= sequence.len() {
            return;
        }
        sequence.extents = sequence.slice(0, keep);
        sequence.open_group = None;
        if sequence.extents.is_empty() {
            self.sequences.remove(&seq);
        }
    }

    /// Records that `dst` (emptied first) now shares the first `len` positions of `src`.
    pub fn copy_prefix(&mut self, src: i32, dst: i32, len: u32) {
        self.sequences.remove(&dst);
        let Some(source) = self.sequences.get(&src) else { return };
        let extents = source.slice(0, len);
        if !extents.is_empty() {
            self.sequences.insert(dst, Sequence { extents, open_group: None });
        }
    }

    /// Records that the cells at `ranges` (start, length) of `seq`'s positions are moved aside,
    /// to be taken back in this order by [`CellLedger::unpark`]. The caller then truncates
    /// `seq` below them.
    pub fn park(&mut self, seq: i32, ranges: &[(u32, u32)]) {
        let Some(sequence) = self.sequences.get(&seq) else { return };
        let runs: Vec<Extent> =
            ranges.iter().flat_map(|&(start, len)| sequence.slice(start, start + len)).collect();
        self.parked.entry(seq).or_default().extend(runs);
    }

    /// Records that the next `len` parked cells of `seq` are back at its end.
    pub fn unpark(&mut self, seq: i32, len: u32) {
        let Some(parked) = self.parked.get_mut(&seq) else { return };
        let sequence = self.sequences.entry(seq).or_default();
        let mut left = len;
        while left > 0 {
            let Some(run) = parked.front_mut() else { break };
            let take = run.len.min(left);
            push_merged(&mut sequence.extents, Extent { len: take, ..*run });
            run.first += take;
            run.len -= take;
            left -= take;
            if run.len == 0 {
                parked.pop_front();
            }
        }
        sequence.open_group = None;
        if parked.is_empty() {
            self.parked.remove(&seq);
        }
    }

    /// Records that what `seq` still had parked is gone.
    pub fn drop_parked(&mut self, seq: i32) {
        self.parked.remove(&seq);
    }

    /// Cells in use: per group, the union of the runs held.
    pub fn used(&self) -> u32 {
        self.used_without(None)
    }

    fn used_without(&self, left_out: Option<i32>) -> u32 {
        let mut runs: HashMap<u64, Vec<(u32, u32)>> = HashMap::new();
        let held = self.sequences.iter().flat_map(|(seq, sequence)| sequence.extents.iter().map(move |extent| (*seq, extent)));
        let parked = self.parked.iter().flat_map(|(seq, runs)| runs.iter().map(move |extent| (*seq, extent)));
        for (seq, extent) in held.chain(parked) {
            if Some(seq) != left_out {
                runs.entry(extent.group).or_default().push((extent.first, extent.end()));
            }
        }
        runs.into_values().map(union_length).sum()
    }

    /// Cells that only `seq` holds: what removing it would free.
    pub fn exclusive(&self, seq: i32) -> u32 {
        if !self.sequences.contains_key(&seq) && !self.parked.contains_key(&seq) {
            return 0;
        }
        self.used() - self.used_without(Some(seq))
    }

    /// The first position of `seq` from which on no other sequence holds any of its cells:
    /// cells past it may be moved without moving them under anyone else's feet.
    pub fn exclusive_from(&self, seq: i32) -> u32 {
        let Some(sequence) = self.sequences.get(&seq) else { return 0 };
        let others: Vec<&Extent> = self
            .sequences
            .iter()
            .filter(|(other, _)| **other != seq)
            .flat_map(|(_, other)| &other.extents)
            .chain(self.parked.values().flatten())
            .collect();
        let mut position = 0;
        let mut from = 0;
        for extent in &sequence.extents {
            for other in others.iter().filter(|other| other.group == extent.group) {
                let shared_end = other.end().min(extent.end());
                if other.first.max(extent.first) < shared_end {
                    from = from.max(position + (shared_end - extent.first));
                }
            }
            position += extent.len;
        }
        from
    }
}

/// The length of the union of half-open ranges.
fn union_length(mut ranges: Vec<(u32, u32)>) -> u32 {
    ranges.sort_unstable();
    let mut total = 0;
    let mut covered_to = 0;
    for (start, end) in ranges {
        let start = start.max(covered_to);
        if end > start {
            total += end - start;
            covered_to = end;
        }
    }
    total
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

    #[test]
    fn parked_runs_stay_in_use_and_come_back_in_order() {
        let mut ledger = CellLedger::default();
        ledger.append(0, 100);
        // Keep 0..10, drop 10..20 (the changed span), move 20..100 aside.
        ledger.park(0, &[(20, 80)]);
        ledger.truncate(0, 10);
        assert_eq!(ledger.used(), 90, "the dropped span is free, the parked run is not");
        ledger.append(0, 12);
        assert_eq!(ledger.used(), 102, "the new span is new cells");
        ledger.unpark(0, 30);
        ledger.unpark(0, 50);
        assert_eq!(ledger.used(), 102, "taking parked cells back writes nothing");
        assert_eq!(ledger.exclusive(0), 102);
        ledger.truncate(0, 22 + 30);
        assert_eq!(ledger.used(), 52);
    }

    #[test]
    fn runs_put_back_where_they_were_merge_into_one_extent() {
        let mut ledger = CellLedger::default();
        ledger.append(0, 100);
        ledger.park(0, &[(10, 30), (40, 60)]);
        ledger.truncate(0, 10);
        ledger.unpark(0, 30);
        ledger.unpark(0, 60);
        assert_eq!(ledger.sequences[&0].extents.len(), 1, "{:?}", ledger.sequences[&0]);
        assert_eq!(ledger.used(), 100);
    }

    #[test]
    fn dropped_parked_runs_are_freed() {
        let mut ledger = CellLedger::default();
        ledger.append(0, 50);
        ledger.park(0, &[(10, 40)]);
        ledger.truncate(0, 10);
        ledger.drop_parked(0);
        assert_eq!(ledger.used(), 10);
    }

    #[test]
    fn exclusive_from_is_past_every_cell_another_sequence_holds() {
        let mut ledger = CellLedger::default();
        ledger.append(0, 100);
        assert_eq!(ledger.exclusive_from(0), 0);
        ledger.copy_prefix(0, 1, 30);
        assert_eq!(ledger.exclusive_from(0), 30);
        assert_eq!(ledger.exclusive_from(1), 30, "the copy shares all it holds");
        ledger.append(1, 5);
        assert_eq!(ledger.exclusive_from(1), 30);
        ledger.truncate(1, 0);
        assert_eq!(ledger.exclusive_from(0), 0);
    }
}
