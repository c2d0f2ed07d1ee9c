//! Incremental compile. The unit is one endpoint in one direction: its
//! policy entries are kept with a fingerprint of everything they were
//! worked out from, and the next compile replays them instead of working
//! them out again when the fingerprint is the same.
//!
//! What an endpoint's entries depend on, and so what the fingerprint
//! covers: its endpoint id and named container ports; the rules that apply
//! to it, in evaluation order, each with its action, its ports and the
//! identities of the peer classes it names (not its selectors: they only
//! matter through those classes); the attributions its cookies stand for;
//! and, when an egress rule names a port, every pod class's identity and
//! named ports. A pod that joins an existing class, a policy that selects
//! other pods, or a label no rule looks at leaves it unchanged.
//!
//! Before any of that, [`super::unaffected`] replays the endpoints whose
//! inputs are all exactly as the previous compile saw them, without working
//! out their layers or fingerprint.
//!
//! The fingerprint is 128 bits from two SipHash instances with random keys
//! (fixed for the compiler's life). The property test in
//! `agreement_tests.rs` checks after every step of random change sequences
//! that incremental output equals a compile that replays nothing.

use std::hash::{BuildHasher, Hash, Hasher};

use foldhash::{HashMap, HashSet};

use portcullis_common::PolicyValue;

use super::{
    ids::IdRound,
    unaffected::{EndpointInputs, SharedInputs},
    Attribution, Compiled,
};
use crate::policy::model::{Direction, Workload};

/// The entries of one endpoint and direction, and what they came from.
#[derive(Debug, Clone)]
pub struct Memoized {
    /// `None`: no rule applies to the endpoint in this direction (no
    /// entries, and no fingerprint was worked out).
    fingerprint: Option<u128>,
    /// The cookies the entries use: an attribution keeps its cookie while
    /// compiles use it, so a replay keeps the cookie by number and the
    /// entries stay as they were. What each stands for is in the compile's
    /// cookies, which the next compile starts from.
    cookies: Vec<u32>,
    /// The endpoint as it was when these entries were last right for it.
    made_for: EndpointInputs,
}

/// An endpoint id (one workload for the compiler's life) and direction.
pub type MemoKey = (u32, Direction);

/// Entries of the latest successful compile, by endpoint and direction.
#[derive(Debug, Clone, Default)]
pub struct Memo {
    keys: [std::collections::hash_map::RandomState; 2],
    entries: HashMap<MemoKey, Memoized>,
    /// What the entries' compile was made from, beyond each endpoint.
    shared: Option<SharedInputs>,
    /// That compile's rules: exactly the entries above, all together. The
    /// next compile starts from them and changes only the endpoints it
    /// works out again or no longer has, instead of inserting every entry
    /// of every endpoint again (tens of thousands at cluster scale).
    rules: Option<Rules>,
    /// That compile's cookies, which every replayed entry's are among.
    cookies: Option<Cookies>,
}

pub type Rules = std::sync::Arc<super::RuleTable>;

/// Rule cookie → what decided.
pub type Cookies = std::sync::Arc<std::collections::BTreeMap<u32, Attribution>>;

/// What a compile takes from the memo (see [`Memo::take`]).
#[derive(Default)]
pub struct Taken {
    pub entries: HashMap<MemoKey, Memoized>,
    pub shared: Option<SharedInputs>,
    pub rules: Option<Rules>,
    pub cookies: Option<Cookies>,
}

/// How much one compile reused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reuse {
    /// Endpoint-directions replayed from the previous compile.
    pub replayed: usize,
    /// Of those, the ones replayed without working out their rules at all,
    /// because nothing they depend on changed (see [`super::unaffected`]).
    pub unexamined: usize,
    /// Endpoint-directions worked out.
    pub computed: usize,
}

/// Both hashers at once.
pub struct Fingerprinter(
    std::collections::hash_map::DefaultHasher,
    std::collections::hash_map::DefaultHasher,
);

impl Hasher for Fingerprinter {
    fn write(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
        self.1.write(bytes);
    }

    fn finish(&self) -> u64 {
        self.0.finish()
    }
}

impl Fingerprinter {
    pub fn fingerprint(&self) -> u128 {
        (u128::from(self.0.finish()) << 64) | u128::from(self.1.finish())
    }

    pub fn add(&mut self, value: &impl Hash) {
        value.hash(self);
    }
}

impl Memo {
    pub fn fingerprinter(&self) -> Fingerprinter {
        Fingerprinter(self.keys[0].build_hasher(), self.keys[1].build_hasher())
    }

    /// Takes the entries out for a compile, with what their compile was
    /// made from; what it does not hand back in [`Memo::restore`] is
    /// forgotten (an endpoint that went away).
    pub fn take(&mut self) -> Taken {
        Taken {
            entries: std::mem::take(&mut self.entries),
            shared: self.shared.take(),
            rules: self.rules.take(),
            cookies: self.cookies.take(),
        }
    }

    /// After a successful compile: its entries, what it was made from, its
    /// rules (exactly those entries) and its cookies.
    pub fn restore(
        &mut self,
        entries: HashMap<MemoKey, Memoized>,
        shared: SharedInputs,
        rules: Rules,
        cookies: Cookies,
    ) {
        self.entries = entries;
        self.shared = Some(shared);
        self.rules = Some(rules);
        self.cookies = Some(cookies);
    }
}

/// Records what the entries of one endpoint-direction use while they are
/// worked out. The entries themselves are not recorded: they stay in the
/// compile's rules, where their endpoint id and direction find them again
/// ([`withdraw`]). Holding each one's slot a second time here took about
/// 8 MiB at 20,000 pods (heaptrack, at the agent's peak).
#[derive(Default)]
pub struct Recorder {
    /// Indexes in the layers' attributions already recorded.
    seen: HashSet<usize>,
    cookies: Vec<u32>,
}

impl Recorder {
    /// An entry with `value` was written; `attribution` is what its
    /// cookie stands for (by its index in the layers), if anything.
    pub fn record(&mut self, value: &PolicyValue, attribution: Option<usize>) {
        if let Some(index) = attribution {
            if self.seen.insert(index) {
                self.cookies.push(value.rule_cookie);
            }
        }
    }

    pub fn finish(self, fingerprint: u128, made_for: EndpointInputs) -> Memoized {
        Memoized {
            fingerprint: Some(fingerprint),
            cookies: self.cookies,
            made_for,
        }
    }
}

impl Memoized {
    /// An endpoint-direction no rule applies to.
    pub fn nothing_applies(made_for: EndpointInputs) -> Self {
        Self {
            fingerprint: None,
            cookies: Vec::new(),
            made_for,
        }
    }

    pub fn fingerprint(&self) -> Option<u128> {
        self.fingerprint
    }

    /// Whether these entries were made for the endpoint as it is now.
    pub fn made_for(&self, endpoint: &Workload, endpoint_id: u32) -> bool {
        self.made_for.same(endpoint, endpoint_id)
    }

    /// Right for the endpoint as it is now too (its fingerprint matched).
    pub fn now_for(mut self, made_for: EndpointInputs) -> Self {
        self.made_for = made_for;
        self
    }

    /// Whether any rule applies (there are entries to replay).
    pub fn applies(&self) -> bool {
        self.fingerprint.is_some()
    }

    /// Uses the entries again. They are in `out` already (a compile starts
    /// from the rules of the compile they come from); their attributions
    /// had cookies in that compile, the latest successful one, so the
    /// cookies are the same now and are kept by number (what they stand
    /// for joins at the end, see [`all_cookies`]).
    pub fn replay(&self, cookie_ids: &mut IdRound<'_, Attribution>) {
        for cookie in &self.cookies {
            cookie_ids.keep(*cookie);
        }
    }
}

/// A compile's cookies: those of the previous compile (`before`) it kept,
/// which its replayed entries use, and those it `written` for the entries
/// it worked out. A pass that kept every cookie and made none is most
/// passes: the previous map is used again, not rebuilt. Before, each
/// replayed endpoint looked up and copied its cookies into a new map,
/// tens of thousands of lookups a pass at cluster scale.
pub fn all_cookies(
    before: Option<Cookies>,
    written: Cookies,
    kept: impl Fn(u32) -> bool,
) -> Cookies {
    let Some(before) = before else {
        return written;
    };
    if before.keys().all(|id| kept(*id)) && written.keys().all(|id| before.contains_key(id)) {
        return before;
    }
    let carried = before
        .iter()
        .filter(|(id, _)| kept(**id))
        .map(|(id, a)| (*id, a.clone()));
    // Equal where both have a cookie: ids are never reused.
    let all = carried
        .chain(written.iter().map(|(id, a)| (*id, a.clone())))
        .collect();
    std::sync::Arc::new(all)
}

/// Takes the entries of `key` out of `out`, which started from the rules
/// of the compile that made them: the endpoint-direction is worked out
/// again, or gone. Its other direction's stay, and only its endpoint's
/// block is copied (see [`super::RuleTable`]).
pub fn withdraw(out: &mut Compiled, (endpoint_id, direction): MemoKey) {
    let direction = direction.kernel_value();
    // Not copied when shared: most withdrawn directions had no entries.
    if out.rules.has_direction(endpoint_id, direction) {
        std::sync::Arc::make_mut(&mut out.rules).withdraw(endpoint_id, direction);
    }
}
