//! Port sets as the kernel stores them: which rule allows each port (first
//! rule wins), encoded as disjoint aligned prefix blocks for an LPM trie.

use std::collections::BTreeMap;

/// One past the largest port, in a type wide enough to hold it.
const PORT_SPACE: u32 = 1 << 16;

/// A run of ports allowed by one rule (`rule` is the rule's position in
/// the endpoint's ordered rule list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub first: u16,
    pub last: u16,
    pub rule: usize,
}

/// Collects which rule allows each port; ports not covered are denied.
#[derive(Debug, Default)]
pub struct PortPartition {
    /// first port → (last port, rule); disjoint.
    runs: BTreeMap<u32, (u32, usize)>,
}

impl PortPartition {
    /// Gives the ports of `first..=last` that no earlier rule claimed to
    /// `rule`. Claim in rule order so the first matching rule is credited.
    pub fn claim(&mut self, first: u16, last: u16, rule: usize) {
        let (first, last) = (u32::from(first), u32::from(last));
        let mut cursor = first;
        // A run starting before `first` may cover its beginning.
        if let Some((_, &(run_last, _))) = self.runs.range(..first).next_back() {
            cursor = cursor.max(run_last + 1);
        }
        let mut gaps = Vec::new();
        for (&run_first, &(run_last, _)) in self.runs.range(first..=last) {
            if run_first > cursor {
                gaps.push((cursor, run_first - 1));
            }
            cursor = cursor.max(run_last + 1);
        }
        if cursor <= last {
            gaps.push((cursor, last));
        }
        for (gap_first, gap_last) in gaps {
            self.runs.insert(gap_first, (gap_last, rule));
        }
    }

    /// The runs in port order, adjacent runs of one rule merged, so equal
    /// verdicts give equal lists. Ports are < 2^16, so the casts are lossless.
    pub fn into_segments(self) -> Vec<Segment> {
        let mut segments: Vec<Segment> = Vec::with_capacity(self.runs.len());
        for (first, (last, rule)) in self.runs {
            match segments.last_mut() {
                Some(prev) if prev.rule == rule && u32::from(prev.last) + 1 == first => {
                    prev.last = last as u16;
                }
                _ => segments.push(Segment {
                    first: first as u16,
                    last: last as u16,
                    rule,
                }),
            }
        }
        segments
    }
}

/// Splits `first..=last` into the fewest aligned blocks `(port, prefix_len)`
/// (the block is the ports sharing the top `prefix_len` bits of `port`).
pub fn prefix_blocks(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut blocks = Vec::new();
    let mut start = u32::from(first);
    let end = u32::from(last) + 1;
    while start < end {
        // Largest block aligned at `start`, shrunk until it fits.
        let mut size = if start == 0 {
            PORT_SPACE
        } else {
            1 << start.trailing_zeros()
        };
        while start + size > end {
            size >>= 1;
        }
        blocks.push((start as u16, (16 - size.trailing_zeros()) as u8));
        start += size;
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_blocks_are_minimal_and_aligned() {
        assert_eq!(prefix_blocks(80, 80), vec![(80, 16)]);
        assert_eq!(prefix_blocks(80, 81), vec![(80, 15)]);
        assert_eq!(prefix_blocks(0, 65535), vec![(0, 0)]);
        assert_eq!(prefix_blocks(79, 80), vec![(79, 16), (80, 16)]);
        // 1-65535: every power-of-two block from 1 up to 32768.
        let blocks = prefix_blocks(1, 65535);
        assert_eq!(blocks.len(), 16);
        assert_eq!(blocks[0], (1, 16));
        assert_eq!(blocks[1], (2, 15));
        assert_eq!(blocks[15], (32768, 1));
        assert_eq!(prefix_blocks(65535, 65535), vec![(65535, 16)]);
        assert_eq!(
            prefix_blocks(8000, 8100),
            vec![(8000, 10), (8064, 11), (8096, 14), (8100, 16)]
        );
    }

    #[test]
    fn prefix_blocks_cover_exactly_the_range() {
        for (first, last) in [
            (0, 0),
            (1, 1),
            (3, 1000),
            (1024, 2047),
            (8000, 8100),
            (0, 65534),
            (1, 65535),
        ] {
            let mut covered = Vec::new();
            for (port, len) in prefix_blocks(first, last) {
                let size = 1u32 << (16 - u32::from(len));
                assert_eq!(u32::from(port) % size, 0, "block {port}/{len} is aligned");
                covered.extend(u32::from(port)..u32::from(port) + size);
            }
            let expected: Vec<u32> = (u32::from(first)..=u32::from(last)).collect();
            assert_eq!(covered, expected, "{first}-{last}");
        }
    }

    #[test]
    fn first_claim_wins_and_runs_merge() {
        let mut p = PortPartition::default();
        p.claim(80, 90, 0);
        p.claim(85, 100, 1);
        p.claim(70, 80, 2);
        p.claim(91, 95, 0); // already rule 1's
        p.claim(101, 101, 1); // extends rule 1's run
        p.claim(60, 60, 2);
        p.claim(61, 69, 2); // joins 60 and 70-79
        let runs = |p: PortPartition| -> Vec<_> {
            p.into_segments()
                .iter()
                .map(|s| (s.first, s.last, s.rule))
                .collect()
        };
        assert_eq!(runs(p), vec![(60, 79, 2), (80, 90, 0), (91, 101, 1)]);

        let mut p = PortPartition::default();
        p.claim(80, 90, 0);
        p.claim(0, 65535, 1);
        let segments = p.into_segments();
        let ends: Vec<_> = segments.iter().map(|s| (s.first, s.last, s.rule)).collect();
        assert_eq!(ends, vec![(0, 79, 1), (80, 90, 0), (91, 65535, 1)]);
    }
}
