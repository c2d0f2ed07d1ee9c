//! The policy map's entries as a compile leaves them, kept in one block per
//! endpoint. A block is shared, not copied, between compiles, the memo and
//! the states the writer remembers, so a compile that works out a few
//! endpoints again copies only their blocks, and the writer compares
//! blocks by address before it compares entries: at 5,000 pods one table
//! of 26,000 entries was copied and walked twice on every pass that
//! changed any entry.
//!
//! Blocks hold their endpoint's entries in [`PolicySlot`] order, which
//! leads with the endpoint id, so the blocks one after the other are the
//! entries in that order. No block is empty: equal tables have equal
//! blocks.

use std::{collections::BTreeMap, sync::Arc};

use portcullis_common::{PolicySlot, PolicyValue};

/// One endpoint's entries.
pub type Block = BTreeMap<PolicySlot, PolicyValue>;

#[derive(Debug, Clone, Default)]
pub struct RuleTable {
    blocks: BTreeMap<u32, Arc<Block>>,
    len: usize,
}

impl RuleTable {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, slot: &PolicySlot) -> Option<&PolicyValue> {
        self.blocks.get(&slot.endpoint_id)?.get(slot)
    }

    /// Every entry, in [`PolicySlot`] order.
    pub fn iter(&self) -> impl Iterator<Item = (&PolicySlot, &PolicyValue)> {
        self.blocks.values().flat_map(|block| block.iter())
    }

    pub fn keys(&self) -> impl Iterator<Item = &PolicySlot> {
        self.iter().map(|(slot, _)| slot)
    }

    pub fn values(&self) -> impl Iterator<Item = &PolicyValue> {
        self.iter().map(|(_, value)| value)
    }

    /// Each endpoint's entries, by endpoint id.
    pub fn blocks(&self) -> &BTreeMap<u32, Arc<Block>> {
        &self.blocks
    }

    /// The entries of one endpoint (empty when it has none).
    pub fn endpoint(&self, endpoint_id: u32) -> impl Iterator<Item = (&PolicySlot, &PolicyValue)> {
        self.blocks
            .get(&endpoint_id)
            .into_iter()
            .flat_map(|block| block.iter())
    }

    /// Writes one entry; its endpoint's block is copied first if shared.
    pub fn insert(&mut self, slot: PolicySlot, value: PolicyValue) {
        let block = Arc::make_mut(self.blocks.entry(slot.endpoint_id).or_default());
        if block.insert(slot, value).is_none() {
            self.len += 1;
        }
    }

    /// Whether the endpoint has entries in the direction (`DIRECTION_*`).
    pub fn has_direction(&self, endpoint_id: u32, direction: u8) -> bool {
        self.endpoint(endpoint_id)
            .any(|(slot, _)| slot.direction == direction)
    }

    /// Removes the endpoint's entries in the direction; its other
    /// direction's stay. The block is copied only when it has any.
    pub fn withdraw(&mut self, endpoint_id: u32, direction: u8) {
        if !self.has_direction(endpoint_id, direction) {
            return;
        }
        let Some(shared) = self.blocks.get_mut(&endpoint_id) else {
            return;
        };
        let block = Arc::make_mut(shared);
        let before = block.len();
        block.retain(|slot, _| slot.direction != direction);
        self.len -= before - block.len();
        if block.is_empty() {
            self.blocks.remove(&endpoint_id);
        }
    }
}

impl PartialEq for RuleTable {
    /// Shared blocks are equal without a look at their entries.
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && self.blocks.len() == other.blocks.len()
            && self
                .blocks
                .iter()
                .zip(&other.blocks)
                .all(|((a_id, a), (b_id, b))| a_id == b_id && (Arc::ptr_eq(a, b) || a == b))
    }
}

impl Eq for RuleTable {}

impl FromIterator<(PolicySlot, PolicyValue)> for RuleTable {
    fn from_iter<I: IntoIterator<Item = (PolicySlot, PolicyValue)>>(entries: I) -> Self {
        let mut table = Self::default();
        for (slot, value) in entries {
            table.insert(slot, value);
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use portcullis_common::{DIRECTION_EGRESS, DIRECTION_INGRESS, PROTO_TCP};

    use super::*;

    fn slot(endpoint_id: u32, peer_identity: u32, direction: u8, port: u16) -> PolicySlot {
        PolicySlot {
            endpoint_id,
            peer_identity,
            direction,
            protocol: PROTO_TCP,
            port,
            port_prefix_len: 16,
        }
    }

    fn value(rule_cookie: u32) -> PolicyValue {
        PolicyValue {
            rule_cookie,
            ..PolicyValue::default()
        }
    }

    #[test]
    fn entries_come_out_in_slot_order_across_blocks() {
        let slots = [
            slot(7, 1, DIRECTION_INGRESS, 80),
            slot(2, 9, DIRECTION_EGRESS, 53),
            slot(7, 1, DIRECTION_EGRESS, 443),
            slot(2, 3, DIRECTION_INGRESS, 22),
        ];
        let table: RuleTable = slots.iter().map(|s| (*s, value(1))).collect();
        let mut sorted = slots.to_vec();
        sorted.sort();
        let out: Vec<PolicySlot> = table.iter().map(|(s, _)| *s).collect();
        assert_eq!(out, sorted);
        assert_eq!(table.len(), 4);
        assert_eq!(table.blocks().len(), 2);
    }

    #[test]
    fn a_withdrawn_direction_leaves_the_other_and_an_empty_block_goes() {
        let mut table: RuleTable = [
            (slot(4, 1, DIRECTION_INGRESS, 80), value(1)),
            (slot(4, 2, DIRECTION_EGRESS, 80), value(2)),
            (slot(5, 1, DIRECTION_INGRESS, 80), value(3)),
        ]
        .into_iter()
        .collect();
        table.withdraw(4, DIRECTION_INGRESS);
        assert_eq!(table.len(), 2);
        assert!(table.get(&slot(4, 1, DIRECTION_INGRESS, 80)).is_none());
        assert_eq!(
            table.get(&slot(4, 2, DIRECTION_EGRESS, 80)),
            Some(&value(2))
        );
        table.withdraw(4, DIRECTION_EGRESS);
        assert_eq!(table.len(), 1);
        assert!(!table.blocks().contains_key(&4));
        let rebuilt: RuleTable = [(slot(5, 1, DIRECTION_INGRESS, 80), value(3))]
            .into_iter()
            .collect();
        assert_eq!(table, rebuilt, "no empty block is left to tell them apart");
    }

    #[test]
    fn a_change_copies_only_its_endpoints_block() {
        let before: RuleTable = [
            (slot(1, 1, DIRECTION_INGRESS, 80), value(1)),
            (slot(2, 1, DIRECTION_INGRESS, 80), value(2)),
        ]
        .into_iter()
        .collect();
        let mut after = before.clone();
        after.insert(slot(2, 5, DIRECTION_INGRESS, 81), value(3));
        assert!(Arc::ptr_eq(&before.blocks()[&1], &after.blocks()[&1]));
        assert!(!Arc::ptr_eq(&before.blocks()[&2], &after.blocks()[&2]));
        assert!(
            before.get(&slot(2, 5, DIRECTION_INGRESS, 81)).is_none()
                && before.blocks()[&2].len() == 1,
            "the shared block was copied, not changed"
        );
        assert_eq!(after.len(), 3);
        assert_ne!(before, after);
        // Overwriting an entry keeps the count.
        after.insert(slot(2, 5, DIRECTION_INGRESS, 81), value(4));
        assert_eq!(after.len(), 3);
    }
}
