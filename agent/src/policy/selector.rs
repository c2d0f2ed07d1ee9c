//! Kubernetes label selectors: validation of the wire form and matching.
//!
//! A selector matches a label set when every `matchLabels` pair and every
//! `matchExpressions` requirement holds; the empty selector matches
//! everything (as in Kubernetes, where `podSelector: {}` selects all pods).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    ops::Deref,
    sync::Arc,
};

use thiserror::Error;

use crate::{
    intern::Table,
    policy::model::{
        names::{self, abbreviate, NameError},
        LabelSelector, Labels,
    },
};

/// A validated label selector. Equal selectors share their terms: rules
/// repeat a few selectors thousands of times, and each copy of a
/// one-label `matchLabels` map was a half-kilobyte node.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Selector(Arc<SelectorTerms>);

/// What a selector requires.
#[derive(Debug, Default, PartialEq, Eq, Hash)]
pub struct SelectorTerms {
    pub match_labels: Labels,
    pub requirements: Vec<Requirement>,
}

/// Every selector's terms, shared (see [`Selector`]). Process-wide: the
/// parser that makes selectors keeps no state between policies.
static SELECTORS: Table<SelectorTerms> = Table::new();

impl Deref for Selector {
    type Target = SelectorTerms;

    fn deref(&self) -> &SelectorTerms {
        &self.0
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Selector")
            .field("match_labels", &self.match_labels)
            .field("requirements", &self.requirements)
            .finish()
    }
}

impl Default for Selector {
    fn default() -> Self {
        Self::new(Labels::new(), Vec::new())
    }
}

/// One `matchExpressions` entry, with the operator's value rules enforced by
/// construction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Requirement {
    In {
        key: String,
        values: BTreeSet<String>,
    },
    NotIn {
        key: String,
        values: BTreeSet<String>,
    },
    Exists {
        key: String,
    },
    DoesNotExist {
        key: String,
    },
}

/// Why a selector is invalid. `index` is the position in `matchExpressions`.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error("unknown operator {operator:?} (expected In, NotIn, Exists or DoesNotExist)")]
    UnknownOperator { index: usize, operator: String },
    #[error("operator {operator} on key {key:?} needs at least one value")]
    MissingValues {
        index: usize,
        key: String,
        operator: &'static str,
    },
    #[error("operator {operator} on key {key:?} takes no values")]
    UnexpectedValues {
        index: usize,
        key: String,
        operator: &'static str,
    },
    #[error("empty label key")]
    EmptyKey { index: usize },
    /// `index` is `None` for `matchLabels`. Keys and values are abbreviated.
    #[error("label key {key:?} is invalid")]
    InvalidKey {
        index: Option<usize>,
        key: String,
        #[source]
        source: NameError,
    },
    #[error("label value {value:?} of key {key:?} is invalid")]
    InvalidValue {
        index: Option<usize>,
        key: String,
        value: String,
        #[source]
        source: NameError,
    },
}

impl SelectorError {
    /// Where in the selector the problem is, relative to the selector itself.
    pub fn field(&self) -> String {
        match self {
            Self::UnknownOperator { index, .. } => format!("matchExpressions[{index}].operator"),
            Self::MissingValues { index, .. } | Self::UnexpectedValues { index, .. } => {
                format!("matchExpressions[{index}].values")
            }
            Self::EmptyKey { index }
            | Self::InvalidKey {
                index: Some(index), ..
            } => format!("matchExpressions[{index}].key"),
            Self::InvalidValue {
                index: Some(index), ..
            } => format!("matchExpressions[{index}].values"),
            Self::InvalidKey { index: None, .. } | Self::InvalidValue { index: None, .. } => {
                "matchLabels".to_string()
            }
        }
    }
}

impl Selector {
    /// The selector of these terms (their shared copy).
    pub fn new(match_labels: Labels, requirements: Vec<Requirement>) -> Self {
        Self(SELECTORS.share_owned(SelectorTerms {
            match_labels,
            requirements,
        }))
    }

    /// The selector that matches every label set.
    pub fn everything() -> Self {
        Self::default()
    }

    /// Validates the wire form.
    pub fn from_label_selector(raw: &LabelSelector) -> Result<Self, SelectorError> {
        let match_labels = raw.match_labels.clone().unwrap_or_default();
        for (key, value) in &match_labels {
            check_label(None, key, [value])?;
        }
        let mut requirements = Vec::new();
        for (index, expr) in raw.match_expressions.iter().flatten().enumerate() {
            if expr.key.is_empty() {
                return Err(SelectorError::EmptyKey { index });
            }
            check_label(Some(index), &expr.key, expr.values.iter().flatten())?;
            let key = expr.key.clone();
            let values: BTreeSet<String> = expr.values.iter().flatten().cloned().collect();
            let requirement = match expr.operator.as_str() {
                "In" | "NotIn" => {
                    let operator = if expr.operator == "In" { "In" } else { "NotIn" };
                    if values.is_empty() {
                        return Err(SelectorError::MissingValues {
                            index,
                            key,
                            operator,
                        });
                    }
                    if operator == "In" {
                        Requirement::In { key, values }
                    } else {
                        Requirement::NotIn { key, values }
                    }
                }
                "Exists" | "DoesNotExist" => {
                    let operator = if expr.operator == "Exists" {
                        "Exists"
                    } else {
                        "DoesNotExist"
                    };
                    if !values.is_empty() {
                        return Err(SelectorError::UnexpectedValues {
                            index,
                            key,
                            operator,
                        });
                    }
                    if operator == "Exists" {
                        Requirement::Exists { key }
                    } else {
                        Requirement::DoesNotExist { key }
                    }
                }
                other => {
                    return Err(SelectorError::UnknownOperator {
                        index,
                        operator: abbreviate(other),
                    })
                }
            };
            requirements.push(requirement);
        }
        Ok(Self::new(match_labels, requirements))
    }

    /// The label keys the selector looks at: a label set's other keys never
    /// change what it matches.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.match_labels
            .keys()
            .map(String::as_str)
            .chain(self.requirements.iter().map(|r| match r {
                Requirement::In { key, .. }
                | Requirement::NotIn { key, .. }
                | Requirement::Exists { key }
                | Requirement::DoesNotExist { key } => key.as_str(),
            }))
    }

    /// Does this selector match every label set?
    pub fn is_everything(&self) -> bool {
        self.match_labels.is_empty() && self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.requirements.iter().all(|r| r.matches(labels))
    }
}

/// Checks a label key and values as Kubernetes does.
fn check_label<'a>(
    index: Option<usize>,
    key: &str,
    values: impl IntoIterator<Item = &'a String>,
) -> Result<(), SelectorError> {
    names::label_key(key).map_err(|source| SelectorError::InvalidKey {
        index,
        key: abbreviate(key),
        source,
    })?;
    for value in values {
        names::label_value(value).map_err(|source| SelectorError::InvalidValue {
            index,
            key: abbreviate(key),
            value: abbreviate(value),
            source,
        })?;
    }
    Ok(())
}

impl Requirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::In { key, values } => labels.get(key).is_some_and(|v| values.contains(v)),
            // As in Kubernetes: a pod without the key satisfies NotIn.
            Self::NotIn { key, values } => labels.get(key).is_none_or(|v| !values.contains(v)),
            Self::Exists { key } => labels.contains_key(key),
            Self::DoesNotExist { key } => !labels.contains_key(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, operator: &str, values: Option<&[&str]>) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: values.map(|v| v.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn selector(match_labels: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>) -> Selector {
        Selector::from_label_selector(&LabelSelector {
            match_labels: Some(labels(match_labels)),
            match_expressions: Some(exprs),
        })
        .unwrap()
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = Selector::from_label_selector(&LabelSelector::default()).unwrap();
        assert!(s.is_everything());
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("app", "web")])));
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let s = selector(
            &[("app", "web")],
            vec![expr("tier", "In", Some(&["front", "back"]))],
        );
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "db"), ("tier", "front")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "middle")])));
    }

    #[test]
    fn operators() {
        let not_in = selector(&[], vec![expr("env", "NotIn", Some(&["prod"]))]);
        assert!(not_in.matches(&labels(&[])), "absent key satisfies NotIn");
        assert!(not_in.matches(&labels(&[("env", "dev")])));
        assert!(!not_in.matches(&labels(&[("env", "prod")])));

        let exists = selector(&[], vec![expr("env", "Exists", None)]);
        assert!(exists.matches(&labels(&[("env", "")])));
        assert!(!exists.matches(&labels(&[("other", "x")])));

        let absent = selector(&[], vec![expr("env", "DoesNotExist", Some(&[]))]);
        assert!(absent.matches(&labels(&[("other", "x")])));
        assert!(!absent.matches(&labels(&[("env", "prod")])));
    }

    #[test]
    fn invalid_expressions_are_rejected_with_their_position() {
        let check = |e: LabelSelectorRequirement| {
            Selector::from_label_selector(&LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![expr("ok", "Exists", None), e]),
            })
            .unwrap_err()
        };
        let err = check(expr("env", "In", None));
        assert!(matches!(err, SelectorError::MissingValues { index: 1, .. }));
        assert_eq!(err.field(), "matchExpressions[1].values");
        assert!(matches!(
            check(expr("env", "NotIn", Some(&[]))),
            SelectorError::MissingValues { .. }
        ));
        assert!(matches!(
            check(expr("env", "Exists", Some(&["x"]))),
            SelectorError::UnexpectedValues { .. }
        ));
        let err = check(expr("env", "Equals", Some(&["x"])));
        assert_eq!(err.field(), "matchExpressions[1].operator");
        assert!(err.to_string().contains("\"Equals\""));
        assert!(matches!(
            check(expr("", "Exists", None)),
            SelectorError::EmptyKey { index: 1 }
        ));
    }
}
