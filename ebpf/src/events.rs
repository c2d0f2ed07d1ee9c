//! Flow events to the agent, rate-limited per CPU so a flood of denied
//! connections costs a counter increment, not a ring buffer write each.

use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use portcullis_common::{
    decide::Flow, EndpointValue, FlowEvent, PolicyValue, EVENTS_BURST, EVENTS_PER_SECOND_PER_CPU,
};

use crate::maps::{EVENTS, EVENTS_LOST, EVENT_BUDGET};

const NS_PER_TOKEN: u64 = 1_000_000_000 / EVENTS_PER_SECOND_PER_CPU;

/// Takes one token from this CPU's bucket, refilling it for the time passed.
#[inline(always)]
fn take_token(now: u64) -> bool {
    let Some(b) = EVENT_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU value; programs on this CPU do not preempt each other
    // in the middle of this sequence for the same map value.
    let b = unsafe { &mut *b };
    let earned = now.saturating_sub(b.refilled_ns) / NS_PER_TOKEN;
    if earned > 0 {
        b.tokens = (b.tokens + earned).min(EVENTS_BURST);
        b.refilled_ns = now;
    }
    if b.tokens == 0 {
        return false;
    }
    b.tokens -= 1;
    true
}

#[inline(always)]
fn lost() {
    if let Some(n) = EVENTS_LOST.get_ptr_mut(0) {
        // SAFETY: per-CPU value, only this CPU writes it.
        unsafe { *n += 1 };
    }
}

/// Reports a decision on a new flow.
#[inline(always)]
pub fn emit(ep: &EndpointValue, flow: &Flow, v: &PolicyValue, flags: u8) {
    // The bucket runs on the coarse clock, which reads no hardware counter;
    // only an event that is sent takes the precise time.
    // SAFETY: helper without arguments.
    if !take_token(unsafe { bpf_ktime_get_coarse_ns() }) {
        lost();
        return;
    }
    let event = FlowEvent {
        // SAFETY: helper without arguments.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        endpoint_id: ep.endpoint_id,
        rule_cookie: v.rule_cookie,
        peer_addr: flow.peer_addr,
        peer_port: flow.peer_port,
        port: flow.policy_port,
        direction: flow.direction,
        verdict: v.verdict,
        reason: v.reason,
        protocol: flow.protocol,
        flags,
        _pad: [0; 7],
    };
    if EVENTS.output::<FlowEvent>(&event, 0).is_err() {
        lost();
    }
}
