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

/// The clock the event budget is kept by.
pub enum Clock {
    /// Reads no hardware counter: under a hypervisor the precise clock cost
    /// about 60 ns a read, on every counted decision.
    Coarse,
    /// For BPF LSM programs: the kernel offers the coarse clock to no
    /// tracing-type program, and would refuse to load them.
    Precise,
}

impl Clock {
    #[inline(always)]
    fn now(&self) -> u64 {
        // SAFETY: helpers without arguments.
        unsafe {
            match self {
                Clock::Coarse => bpf_ktime_get_coarse_ns(),
                Clock::Precise => bpf_ktime_get_ns(),
            }
        }
    }
}

/// Reports a decision on a new flow, keeping the budget by `clock`; the
/// event's own timestamp is always the precise time.
#[inline(always)]
pub fn emit(ep: &EndpointValue, flow: &Flow, v: &PolicyValue, flags: u8, clock: Clock) {
    if !take_token(clock.now()) {
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
