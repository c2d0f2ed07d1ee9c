//! One wording for "what decided": the compiler's [`Attribution`] of a map
//! entry and the evaluator's [`DirectionVerdict`] describe the same decider
//! with the same words, so comparing descriptions compares deciders.

use std::fmt::Write as _;

use super::{
    compile::Attribution,
    evaluate::{AuditCause, DirectionVerdict},
    PolicyRef,
};

fn refs(policies: &[PolicyRef]) -> String {
    let mut s = String::new();
    for (i, p) in policies.iter().enumerate() {
        let _ = write!(s, "{}{p}", if i > 0 { ", " } else { "" });
    }
    s
}

/// What a kernel map entry's rule cookie stands for: worded as the
/// evaluator's verdict for the same decider.
pub fn attribution(a: &Attribution) -> String {
    verdict(&as_verdict(a))
}

/// The evaluator's verdict that names the same decider as `a`.
pub fn as_verdict(a: &Attribution) -> DirectionVerdict {
    match a.clone() {
        Attribution::Rule {
            policy, rule_index, ..
        } => DirectionVerdict::Allowed { policy, rule_index },
        Attribution::DefaultDeny { isolated_by, .. } => {
            DirectionVerdict::DefaultDeny { isolated_by }
        }
        Attribution::DenyRule {
            policy, rule_index, ..
        } => DirectionVerdict::Denied { policy, rule_index },
        Attribution::TierRule {
            tier,
            priority,
            policy,
            rule_index,
            action,
            ..
        } => DirectionVerdict::Tier {
            tier,
            priority,
            policy,
            rule_index,
            action,
        },
        Attribution::AuditDenyRule {
            policy, rule_index, ..
        } => DirectionVerdict::Audit {
            policy,
            cause: AuditCause::DenyRule { rule_index },
        },
        Attribution::AuditDefaultDeny { policy, .. } => DirectionVerdict::Audit {
            policy,
            cause: AuditCause::DefaultDeny,
        },
    }
}

/// What the evaluator says decided one direction.
pub fn verdict(v: &DirectionVerdict) -> String {
    match v {
        DirectionVerdict::NotEnforced => "not enforced on this node".into(),
        DirectionVerdict::NotIsolated => "allowed: no policy isolates it".into(),
        DirectionVerdict::Local => "allowed: loopback or own address".into(),
        DirectionVerdict::Host => "allowed: from this node".into(),
        DirectionVerdict::Allowed { policy, rule_index } => {
            format!("allowed by {policy} rule {rule_index}")
        }
        DirectionVerdict::DefaultDeny { isolated_by } => {
            format!("denied by default: isolated by {}", refs(isolated_by))
        }
        DirectionVerdict::Denied { policy, rule_index } => {
            format!("denied by {policy} deny rule {rule_index}")
        }
        DirectionVerdict::Tier {
            tier,
            priority,
            policy,
            rule_index,
            action,
        } => {
            format!("{action:?} by {policy} rule {rule_index} ({tier:?} tier, priority {priority})")
        }
        DirectionVerdict::Audit { policy, cause } => match cause {
            AuditCause::DenyRule { rule_index } => {
                format!("audit: {policy} deny rule {rule_index} would deny")
            }
            AuditCause::DefaultDeny => format!("audit: {policy} would deny by default (isolation)"),
        },
    }
}
