//! Which CPU runs what in the overhead bench. The flood gets a CPU of its
//! own; the measured client, its server, the agent and the flow-event
//! reader share another. Without that split the flood and the client fight
//! for the same CPUs and the client's rate swings 10× between rounds.

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The flooding pod.
    pub flood: usize,
    /// The allowed client, its server, the agent and the event reader.
    pub workload: usize,
}

impl Layout {
    /// Picks the first two CPUs this process may use. More CPUs are left
    /// alone: one CPU per side keeps the numbers comparable between
    /// machines. With one CPU the flood and the client share it.
    pub fn plan(allowed: &[usize]) -> Self {
        let first = allowed.first().copied().unwrap_or(0);
        Self {
            flood: first,
            workload: allowed.get(1).copied().unwrap_or(first),
        }
    }

    /// Whether the flood runs apart from the measured client, which the
    /// client's rate during the flood needs to mean anything.
    pub fn separated(&self) -> bool {
        self.flood != self.workload
    }

    pub fn describe(&self) -> String {
        if self.separated() {
            format!(
                "the flooding pod on CPU {}; the allowed client, its server, the agent and \
                 the flow-event reader on CPU {}",
                self.flood, self.workload
            )
        } else {
            format!(
                "everything on CPU {}, the only one available: the flood and the allowed \
                 client compete for it, so (2) cannot be measured decisively here",
                self.flood
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_cpus_split_one_does_not() {
        let l = Layout::plan(&[2, 5, 7]);
        assert_eq!((l.flood, l.workload), (2, 5));
        assert!(l.separated());
        let l = Layout::plan(&[3]);
        assert_eq!((l.flood, l.workload), (3, 3));
        assert!(!l.separated());
        assert!(l.describe().contains("cannot be measured decisively"));
    }
}
