//! Drops, forwards and audit verdicts, from the kernel's per-CPU decision
//! counters.
//!
//! The kernel counts per (endpoint, rule cookie, direction, verdict, reason,
//! protocol); the metrics aggregate that to bounded labels. They are fed by
//! deltas: each read adds, per kernel key, what the key gained since the
//! previous read to the series the key maps to *now*. So a series never goes
//! backwards — not when a kernel entry is evicted and recreated (a key whose
//! value dropped restarted from zero: its whole value is new), not when a
//! policy change gives endpoints new cookies, not when two keys stop mapping
//! to the same series. Cookies are never reused (see
//! `policy::compile::ids`), and the agent reads the counters right before it
//! publishes new cookie meanings, so deltas are attributed with the meaning
//! they were counted under.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::Path,
    sync::{Mutex, MutexGuard},
};

use portcullis_common::CounterKey;
use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use super::{
    labels::{self, AuditLabels, DropLabels, ForwardLabels},
    MetricsError,
};
use crate::{
    bpf::{self, CounterSample},
    reconcile::PolicyName,
};

pub struct DecisionMetrics {
    drops: Family<DropLabels, Counter>,
    forwards: Family<ForwardLabels, Counter>,
    audits: Family<AuditLabels, Counter>,
    lost: Counter,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Kernel value per key at the previous read.
    last: HashMap<CounterKey, u64>,
    last_lost: u64,
    /// Rule cookie → policies, as last published.
    cookie_policies: BTreeMap<u32, Vec<PolicyName>>,
    /// Policy-labelled series created so far (to remove those of deleted
    /// policies).
    drop_series: BTreeSet<DropLabels>,
    audit_series: BTreeSet<AuditLabels>,
    /// Entries in the kernel counter map at the previous read.
    entries: usize,
}

impl DecisionMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            drops: Family::default(),
            forwards: Family::default(),
            audits: Family::default(),
            lost: Counter::default(),
            state: Mutex::new(State::default()),
        };
        registry.register(
            "drops",
            "Connections and datagrams dropped by policy, by deciding policy \
             (default deny: the first isolating policy)",
            m.drops.clone(),
        );
        registry.register(
            "forwards",
            "Connections and datagrams let through (reason audit: an audit-mode \
             policy would have dropped them)",
            m.forwards.clone(),
        );
        registry.register(
            "audit",
            "Flows an audit-mode L4Policy would have dropped (they passed), by policy",
            m.audits.clone(),
        );
        registry.register(
            "uncounted_decisions",
            "Decisions the kernel could not count because its counter map was full",
            m.lost.clone(),
        );
        m
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough numbers.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the kernel counters pinned in `pin_dir` and adds what they
    /// gained since the previous read. The lock is held across the read, so
    /// concurrent refreshes cannot count a gain twice.
    pub fn refresh(&self, pin_dir: &Path) -> Result<(), MetricsError> {
        let mut state = self.state();
        let (samples, lost) =
            bpf::read_counters(pin_dir).map_err(|source| MetricsError::Counters { source })?;
        self.add(&mut state, &samples, lost);
        Ok(())
    }

    /// Takes the kernel's current values as the starting point without
    /// counting them: what an earlier agent counted (under cookie numbers
    /// this one does not know) is not attributed to anything.
    pub fn baseline(&self, pin_dir: &Path) -> Result<(), MetricsError> {
        let (samples, lost) =
            bpf::read_counters(pin_dir).map_err(|source| MetricsError::Counters { source })?;
        self.set_baseline(&samples, lost);
        Ok(())
    }

    pub fn set_baseline(&self, samples: &[CounterSample], lost: u64) {
        let mut state = self.state();
        state.last = samples.iter().map(|s| (s.key, s.count)).collect();
        state.last_lost = lost;
        state.entries = samples.len();
    }

    /// Adds the gains of `samples` over the previous read.
    pub fn observe(&self, samples: &[CounterSample], lost: u64) {
        let mut state = self.state();
        self.add(&mut state, samples, lost);
    }

    /// Entries in the kernel counter map at the latest read.
    pub fn kernel_entries(&self) -> usize {
        self.state().entries
    }

    fn add(&self, state: &mut State, samples: &[CounterSample], lost: u64) {
        let mut now = HashMap::with_capacity(samples.len());
        for s in samples {
            let before = state.last.get(&s.key).copied().unwrap_or(0);
            // A smaller value means the entry was removed and recreated in
            // between: everything it holds is new.
            let gained = if s.count >= before {
                s.count - before
            } else {
                s.count
            };
            now.insert(s.key, s.count);
            if gained == 0 {
                continue;
            }
            let series = labels::classify(&s.key, &state.cookie_policies);
            if let Some(l) = series.drop {
                self.drops.get_or_create(&l).inc_by(gained);
                state.drop_series.insert(l);
            }
            if let Some(l) = series.forward {
                self.forwards.get_or_create(&l).inc_by(gained);
            }
            if let Some(l) = series.audit {
                self.audits.get_or_create(&l).inc_by(gained);
                state.audit_series.insert(l);
            }
        }
        // Keys gone from the map start from zero if they come back.
        state.last = now;
        state.entries = samples.len();
        let lost_gained = if lost >= state.last_lost {
            lost - state.last_lost
        } else {
            lost
        };
        self.lost.inc_by(lost_gained);
        state.last_lost = lost;
    }

    /// Adds the meanings of a new generation's cookies to the current ones,
    /// before the read that follows a generation flip: between the flip and
    /// that read the kernel counts under new cookies as well as old ones.
    /// Cookies are never reused, so the union is unambiguous.
    pub fn learn_cookie_policies(&self, cookie_policies: &BTreeMap<u32, Vec<PolicyName>>) {
        let mut state = self.state();
        for (cookie, policies) in cookie_policies {
            state
                .cookie_policies
                .entry(*cookie)
                .or_insert_with(|| policies.clone());
        }
    }

    /// Publishes what rule cookies mean from now on, and removes the series
    /// of policies that no longer exist, so label values stay within the
    /// configured objects. Call [`DecisionMetrics::refresh`] first, so gains
    /// counted under the old meanings are attributed to them.
    pub fn set_cookie_policies(&self, cookie_policies: &BTreeMap<u32, Vec<PolicyName>>) {
        let mut state = self.state();
        // Thousands of cookies name a few hundred policies: spelled once each.
        let policies: BTreeSet<&PolicyName> = cookie_policies.values().flatten().collect();
        let current: BTreeSet<(String, String)> = policies
            .into_iter()
            .map(|p| (p.namespace.clone(), labels::policy_label(p)))
            .collect();
        let keep = |namespace: &str, policy: &str| {
            policy.is_empty() || current.contains(&(namespace.to_string(), policy.to_string()))
        };
        let drops = &self.drops;
        state.drop_series.retain(|l| {
            let k = keep(&l.namespace, &l.policy);
            if !k {
                drops.remove(l);
            }
            k
        });
        let audits = &self.audits;
        state.audit_series.retain(|l| {
            let k = keep(&l.namespace, &l.policy);
            if !k {
                audits.remove(l);
            }
            k
        });
        // A cookie's meaning never changes (cookies are not reused): keep
        // the entries still in use, add the new ones, copy nothing else.
        state
            .cookie_policies
            .retain(|cookie, _| cookie_policies.contains_key(cookie));
        for (cookie, policies) in cookie_policies {
            state
                .cookie_policies
                .entry(*cookie)
                .or_insert_with(|| policies.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use portcullis_common::{
        DIRECTION_EGRESS, PROTO_UDP, REASON_DEFAULT_DENY, REASON_POLICY, VERDICT_AUDIT,
        VERDICT_DENY,
    };

    use super::*;

    fn policy(kind: &str, ns: &str, name: &str) -> PolicyName {
        PolicyName {
            kind: kind.into(),
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn sample(cookie: u32, verdict: u8, reason: u8, count: u64) -> CounterSample {
        CounterSample {
            key: CounterKey {
                endpoint_id: 3,
                rule_cookie: cookie,
                direction: DIRECTION_EGRESS,
                verdict,
                reason,
                protocol: PROTO_UDP,
            },
            count,
        }
    }

    fn setup() -> (Registry, DecisionMetrics) {
        let mut registry = Registry::default();
        let m = DecisionMetrics::register(&mut registry);
        m.set_cookie_policies(&BTreeMap::from([
            (5, vec![policy("NetworkPolicy", "y", "default-deny")]),
            (6, vec![policy("L4Policy", "x", "trial")]),
        ]));
        (registry, m)
    }

    fn drops(m: &DecisionMetrics, ns: &str, policy: &str) -> u64 {
        m.drops
            .get(&DropLabels {
                direction: "egress",
                reason: "default_deny",
                protocol: "udp",
                namespace: ns.into(),
                policy: policy.into(),
            })
            .map_or(0, |c| c.get())
    }

    #[test]
    fn series_follow_kernel_gains_and_never_go_backwards() {
        let (_r, m) = setup();
        m.observe(&[sample(5, VERDICT_DENY, REASON_DEFAULT_DENY, 4)], 0);
        assert_eq!(drops(&m, "y", "NetworkPolicy/default-deny"), 4);
        m.observe(&[sample(5, VERDICT_DENY, REASON_DEFAULT_DENY, 10)], 0);
        assert_eq!(drops(&m, "y", "NetworkPolicy/default-deny"), 10);
        // The entry was evicted and recreated with 3 new decisions: the
        // series grows by 3, it does not fall to 3.
        m.observe(&[sample(5, VERDICT_DENY, REASON_DEFAULT_DENY, 3)], 0);
        assert_eq!(drops(&m, "y", "NetworkPolicy/default-deny"), 13);
        // Gone from the map, then back from zero.
        m.observe(&[], 0);
        assert_eq!(drops(&m, "y", "NetworkPolicy/default-deny"), 13);
        m.observe(&[sample(5, VERDICT_DENY, REASON_DEFAULT_DENY, 2)], 0);
        assert_eq!(drops(&m, "y", "NetworkPolicy/default-deny"), 15);
    }

    #[test]
    fn baseline_values_are_not_counted() {
        let (_r, m) = setup();
        m.set_baseline(&[sample(5, VERDICT_DENY, REASON_DEFAULT_DENY, 100)], 7);
        m.observe(&[sample(5, VERDICT_DENY, REASON_DEFAULT_DENY, 101)], 9);
        assert_eq!(drops(&m, "y", "NetworkPolicy/default-deny"), 1);
        assert_eq!(m.lost.get(), 2);
        assert_eq!(m.kernel_entries(), 1);
    }

    #[test]
    fn audits_feed_audit_and_forwards() {
        let (_r, m) = setup();
        m.observe(&[sample(6, VERDICT_AUDIT, REASON_POLICY, 2)], 0);
        let audit = AuditLabels {
            direction: "egress",
            protocol: "udp",
            namespace: "x".into(),
            policy: "L4Policy/trial".into(),
        };
        assert_eq!(m.audits.get(&audit).map(|c| c.get()), Some(2));
        let fwd = ForwardLabels {
            direction: "egress",
            reason: "audit",
            protocol: "udp",
        };
        assert_eq!(m.forwards.get(&fwd).map(|c| c.get()), Some(2));
    }

    #[test]
    fn series_of_deleted_policies_are_removed() {
        let (_r, m) = setup();
        m.observe(&[sample(5, VERDICT_DENY, REASON_DEFAULT_DENY, 4)], 0);
        m.set_cookie_policies(&BTreeMap::from([(
            6,
            vec![policy("L4Policy", "x", "trial")],
        )]));
        assert!(m
            .drops
            .get(&DropLabels {
                direction: "egress",
                reason: "default_deny",
                protocol: "udp",
                namespace: "y".into(),
                policy: "NetworkPolicy/default-deny".into(),
            })
            .is_none());
        // The old cookie's later gains have no meaning any more: unattributed.
        m.observe(&[sample(5, VERDICT_DENY, REASON_DEFAULT_DENY, 5)], 0);
        assert_eq!(drops(&m, "", ""), 1);
    }

    /// A drop under a new generation's cookie, counted between the flip and
    /// the read that precedes publishing, is attributed to its policy (seen
    /// as unattributed drops right after each change, against a real API
    /// server), and so are the old cookies' last gains.
    #[test]
    fn gains_right_after_a_flip_are_attributed_to_both_generations() {
        let (_r, m) = setup();
        let new = BTreeMap::from([(7, vec![policy("L4Policy", "x", "fresh")])]);
        m.learn_cookie_policies(&new);
        m.observe(
            &[
                sample(5, VERDICT_DENY, REASON_DEFAULT_DENY, 3),
                sample(7, VERDICT_DENY, REASON_DEFAULT_DENY, 2),
            ],
            0,
        );
        assert_eq!(drops(&m, "y", "NetworkPolicy/default-deny"), 3);
        m.set_cookie_policies(&new);
        assert_eq!(drops(&m, "x", "L4Policy/fresh"), 2);
        assert_eq!(drops(&m, "", ""), 0, "nothing unattributed");
    }
}
