//! Which enforced endpoint, if any, owns the socket at hand.

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_skb_ancestor_cgroup_id},
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

/// The generation of the endpoint, identity and policy maps to read.
#[inline(always)]
pub fn active_generation() -> u32 {
    generation_of(active_epoch())
}

#[inline(always)]
fn lookup(generation: u32, cgroup_id: u64) -> Option<EndpointValue> {
    let key = EndpointKey {
        cgroup_id,
        generation,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    unsafe { ENDPOINTS.get(&key).copied() }
}

/// What owns a socket, as the cgroup ancestry says.
pub enum Owner {
    /// An enforced endpoint: judge by its policy.
    Endpoint(EndpointValue),
    /// Below a deny-until-programmed guard, and no deeper cgroup registered.
    NotProgrammed,
    /// Nothing to enforce: no endpoint, or an unenforced (host network) pod.
    Free,
}

/// Searches the cgroup ancestry (root first) for an enforced endpoint: a pod's
/// containers live in cgroups below the pod's cgroup. A pending guard does
/// not end the search (it sits above the pod cgroups it guards); it only
/// decides when nothing deeper is registered.
#[inline(always)]
fn search(generation: u32, ancestor: impl Fn(i32) -> u64) -> Owner {
    let exempt = SETTINGS.get(0).map_or(0, |s| s.exempt_cgroup);
    let mut pending = false;
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH as i32 {
        let id = ancestor(level);
        if id == 0 {
            break;
        }
        if id == exempt {
            return Owner::Free;
        }
        if let Some(ep) = lookup(generation, id) {
            if ep.flags & ENDPOINT_FLAG_UNENFORCED != 0 {
                return Owner::Free;
            }
            if ep.flags & ENDPOINT_FLAG_PENDING == 0 {
                return Owner::Endpoint(ep);
            }
            pending = true;
        }
        level += 1;
    }
    if pending {
        Owner::NotProgrammed
    } else {
        Owner::Free
    }
}

/// The owner of the task making a socket call (connect, sendmsg).
#[inline(always)]
pub fn of_current_task(generation: u32) -> Owner {
    // SAFETY: helper without pointer arguments.
    search(generation, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level)
    })
}

/// The owner of the socket an skb is delivered to.
#[inline(always)]
pub fn of_skb(generation: u32, skb: *mut __sk_buff) -> Owner {
    // SAFETY: skb is the program's context pointer.
    search(generation, |level| unsafe {
        bpf_skb_ancestor_cgroup_id(skb, level)
    })
}
