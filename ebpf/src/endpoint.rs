//! Which enforced endpoint, if any, owns the socket at hand.

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_skb_ancestor_cgroup_id},
};
use portcullis_common::{EndpointKey, EndpointValue, MAX_CGROUP_DEPTH};

use crate::maps::{ENDPOINTS, STATE};

/// The generation of the endpoint, identity and policy maps to read.
#[inline(always)]
pub fn active_generation() -> u32 {
    match STATE.get(0) {
        Some(s) => s.active_generation,
        None => 0,
    }
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

/// Searches the cgroup ancestry (root first) for an enforced endpoint: a pod's
/// containers live in cgroups below the pod's cgroup.
#[inline(always)]
fn search(generation: u32, ancestor: impl Fn(i32) -> u64) -> Option<EndpointValue> {
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH as i32 {
        let id = ancestor(level);
        if id == 0 {
            return None;
        }
        if let Some(ep) = lookup(generation, id) {
            return Some(ep);
        }
        level += 1;
    }
    None
}

/// The endpoint of the task making a socket call (connect, sendmsg).
#[inline(always)]
pub fn of_current_task(generation: u32) -> Option<EndpointValue> {
    // SAFETY: helper without pointer arguments.
    search(generation, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level)
    })
}

/// The endpoint of the socket an skb is delivered to.
#[inline(always)]
pub fn of_skb(generation: u32, skb: *mut __sk_buff) -> Option<EndpointValue> {
    // SAFETY: skb is the program's context pointer.
    search(generation, |level| unsafe {
        bpf_skb_ancestor_cgroup_id(skb, level)
    })
}
