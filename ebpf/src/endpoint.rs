//! Which enforced endpoint, if any, owns the socket at hand.

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_ktime_get_coarse_ns, bpf_skb_ancestor_cgroup_id,
        bpf_skb_cgroup_id,
    },
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use portcullis_common::{
    generation_of, EndpointKey, EndpointValue, ENDPOINT_FLAG_PENDING, ENDPOINT_FLAG_UNENFORCED,
    MAX_CGROUP_DEPTH,
};

use crate::maps::{ENDPOINTS, SETTINGS, STATE};

/// The policy epoch in force (`State::epoch`), read once per decision: its
/// generation and the epoch a conversation is stamped with come from the
/// same read, so they cannot straddle a flip.
#[inline(always)]
pub fn active_epoch() -> u32 {
    match STATE.get(0) {
        Some(s) => s.epoch,
        None => 0,
    }
}

#[inline(always)]
fn lookup(generation: u32, cgroup_id: u64) -> Option<&'static EndpointValue> {
    let key = EndpointKey {
        cgroup_id,
        generation,
        _pad: 0,
    };
    // SAFETY: map memory, read in place.
    unsafe { ENDPOINTS.get(&key) }
}

/// What owns a socket, as the cgroup ancestry says.
#[derive(Clone, Copy)]
pub enum Owner {
    /// An enforced endpoint: judge by its policy.
    Endpoint(EndpointValue),
    /// Below a deny-until-programmed guard, and no deeper cgroup registered.
    NotProgrammed,
    /// Nothing to enforce: no endpoint, or an unenforced (host network) pod.
    Free,
}

/// An [`Owner`] as the search finds it: the endpoint stays in map memory,
/// so no half-written copy of it is ever moved about (the verifier refuses
/// to store a register the compiler left unwritten on some path).
enum Found {
    Endpoint(&'static EndpointValue),
    NotProgrammed,
    Free,
}

impl Found {
    #[inline(always)]
    fn owner(&self) -> Owner {
        match self {
            Found::Endpoint(ep) => Owner::Endpoint(**ep),
            Found::NotProgrammed => Owner::NotProgrammed,
            Found::Free => Owner::Free,
        }
    }
}

/// Searches the cgroup ancestry (root first) for an enforced endpoint: a pod's
/// containers live in cgroups below the pod's cgroup. A pending guard does
/// not end the search (it sits above the pod cgroups it guards); it only
/// decides when nothing deeper is registered.
#[inline(always)]
fn search(generation: u32, exempt: u64, ancestor: impl Fn(i32) -> u64) -> Found {
    let mut pending = false;
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH as i32 {
        let id = ancestor(level);
        if id == 0 {
            break;
        }
        if id == exempt {
            return Found::Free;
        }
        if let Some(ep) = lookup(generation, id) {
            if ep.flags & ENDPOINT_FLAG_UNENFORCED != 0 {
                return Found::Free;
            }
            if ep.flags & ENDPOINT_FLAG_PENDING == 0 {
                return Found::Endpoint(ep);
            }
            pending = true;
        }
        level += 1;
    }
    if pending {
        Found::NotProgrammed
    } else {
        Found::Free
    }
}

/// The owner of the task making a socket call (connect, sendmsg), under
/// policy epoch `epoch`. Searched each time: the socket hooks have no stack
/// left for [`known_or_search`], and make one search per call where the
/// skb hooks make one per judged packet.
#[inline(always)]
pub fn of_current_task(epoch: u32) -> Owner {
    let exempt = SETTINGS.get(0).map_or(0, |s| s.exempt_cgroup);
    // SAFETY: helper without pointer arguments.
    search(generation_of(epoch), exempt, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level)
    })
    .owner()
}

/// The owner of the socket an skb belongs to (the sender on egress, the
/// receiver on ingress), under policy epoch `epoch`.
#[inline(always)]
pub fn of_skb(epoch: u32, skb: *mut __sk_buff) -> Owner {
    // SAFETY: skb is the program's context pointer; both helpers name the
    // cgroup of the same (full) socket, 0 for none.
    known_or_search(epoch, unsafe { bpf_skb_cgroup_id(skb) }, |level| unsafe {
        bpf_skb_ancestor_cgroup_id(skb, level)
    })
}

/// The owner of cgroup `cgroup_id` (whose ancestors `ancestor` names), from
/// the owners already found in this epoch, else by a search that is then
/// kept. What the search finds depends only on the endpoints of the epoch's
/// generation (which the agent never writes while they are in force), the
/// exempt cgroup, and the cgroup's ancestry (which never changes, and whose
/// id is never reused): so the key holds the epoch and the exempt cgroup.
/// As for decisions, an entry is used for at most [`OWNER_MAX_AGE_NS`], so
/// a wrapped epoch cannot meet an entry of its namesake.
#[inline(always)]
fn known_or_search(epoch: u32, cgroup_id: u64, ancestor: impl Fn(i32) -> u64) -> Owner {
    let generation = generation_of(epoch);
    let exempt = SETTINGS.get(0).map_or(0, |s| s.exempt_cgroup);
    if cgroup_id == 0 {
        // No full socket, or no cgroup: nothing to remember it by.
        return search(generation, exempt, ancestor).owner();
    }
    let key = OwnerKey {
        epoch,
        _pad: 0,
        exempt,
        cgroup_id,
    };
    // SAFETY: helper without arguments; the coarse clock reads no hardware
    // counter, and a tick's resolution is plenty for an age.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: plain data, read in place.
    if let Some(known) = unsafe { OWNERS.get(&key) } {
        if now.wrapping_sub(known.at_ns) < OWNER_MAX_AGE_NS {
            return known.owner();
        }
    }
    let found = search(generation, exempt, ancestor);
    // The value is built in a per-CPU scratch slot, not on the stack.
    let Some(scratch) = OWNER_SCRATCH.get_ptr_mut(0) else {
        return found.owner();
    };
    // SAFETY: per-CPU slot; programs on this CPU do not preempt each other
    // between this write and the insert that reads it.
    let scratch = unsafe { &mut *scratch };
    scratch.set(now, &found);
    // A failed insert only means the next packet searches again.
    let _ = OWNERS.insert(&key, scratch, 0);
    found.owner()
}

/// How long a found owner is used before its cgroup is searched again.
const OWNER_MAX_AGE_NS: u64 = 1_000_000_000;

/// Cgroups whose owner is remembered; LRU, so a table full of other
/// cgroups only means searching this one again.
const OWNERS_CAPACITY: u32 = 16_384;

#[repr(C)]
#[derive(Clone, Copy)]
struct OwnerKey {
    epoch: u32,
    _pad: u32,
    exempt: u64,
    cgroup_id: u64,
}

/// An [`Owner`] as plain data, every byte written (the verifier refuses
/// to copy uninitialized padding into a map).
#[repr(C)]
#[derive(Clone, Copy)]
struct KnownOwner {
    at_ns: u64,
    kind: u32,
    _pad: u32,
    ep: EndpointValue,
}

const KIND_FREE: u32 = 0;
const KIND_ENDPOINT: u32 = 1;
const KIND_NOT_PROGRAMMED: u32 = 2;

impl KnownOwner {
    #[inline(always)]
    fn set(&mut self, at_ns: u64, found: &Found) {
        self.at_ns = at_ns;
        match found {
            Found::Free => self.kind = KIND_FREE,
            Found::Endpoint(ep) => {
                self.kind = KIND_ENDPOINT;
                self.ep = **ep;
            }
            Found::NotProgrammed => self.kind = KIND_NOT_PROGRAMMED,
        }
    }

    #[inline(always)]
    fn owner(&self) -> Owner {
        match self.kind {
            KIND_FREE => Owner::Free,
            KIND_ENDPOINT => Owner::Endpoint(self.ep),
            // Only this module writes kinds; were one unknown, fail closed.
            _ => Owner::NotProgrammed,
        }
    }
}

/// Owners found per epoch (see [`known_or_search`]). Not pinned, as the
/// decisions are not: each loaded program set starts with none.
#[map]
static OWNERS: LruHashMap<OwnerKey, KnownOwner> = LruHashMap::with_max_entries(OWNERS_CAPACITY, 0);

#[map]
static OWNER_SCRATCH: PerCpuArray<KnownOwner> = PerCpuArray::with_max_entries(1, 0);
