//! Names and labels, validated as the Kubernetes API server validates them
//! (apimachinery's `IsDNS1123Subdomain`, `IsDNS1123Label`,
//! `IsQualifiedName` and `IsValidLabelValue`), so a file cannot hold what a
//! cluster would refuse, and an oversized name never reaches the kernel
//! maps, the names file or /metrics.

use std::fmt;

use thiserror::Error;

/// Longest DNS-1123 subdomain (object names, label key prefixes).
pub const MAX_SUBDOMAIN: usize = 253;
/// Longest DNS-1123 label (namespace names), label key name and label value.
pub const MAX_LABEL: usize = 63;

/// Which rule a name must follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameRule {
    Subdomain,
    Label,
    LabelKeyPrefix,
    LabelKeyName,
    LabelValue,
}

impl NameRule {
    fn max(self) -> usize {
        match self {
            Self::Subdomain | Self::LabelKeyPrefix => MAX_SUBDOMAIN,
            Self::Label | Self::LabelKeyName | Self::LabelValue => MAX_LABEL,
        }
    }

    fn characters(self) -> &'static str {
        match self {
            Self::Subdomain | Self::LabelKeyPrefix => {
                "may contain only lowercase letters, digits, '-' and '.', with a letter or digit at both ends of each '.'-separated part"
            }
            Self::Label => {
                "may contain only lowercase letters, digits and '-', with a letter or digit at both ends"
            }
            Self::LabelKeyName | Self::LabelValue => {
                "may contain only letters, digits, '-', '_' and '.', with a letter or digit at both ends"
            }
        }
    }
}

impl fmt::Display for NameRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Subdomain => "a name (DNS-1123 subdomain)",
            Self::Label => "a namespace name (DNS-1123 label)",
            Self::LabelKeyPrefix => "a label key prefix (DNS-1123 subdomain)",
            Self::LabelKeyName => "a label key name",
            Self::LabelValue => "a label value",
        })
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum NameError {
    #[error("{rule} must not be empty")]
    Empty { rule: NameRule },
    #[error("{rule} must be at most {max} characters; this one has {len}")]
    TooLong {
        rule: NameRule,
        len: usize,
        max: usize,
    },
    #[error("{rule} {}", rule.characters())]
    Characters { rule: NameRule },
    #[error("a label key has at most one '/' (prefix/name)")]
    KeySlashes,
}

/// A value for messages: long ones are cut, so a 10 MB name does not make
/// a 10 MB message.
pub fn abbreviate(value: &str) -> String {
    const SHOWN: usize = 64;
    match value.char_indices().nth(SHOWN) {
        None => value.to_string(),
        Some((cut, _)) => format!("{}… ({} bytes)", &value[..cut], value.len()),
    }
}

fn check(value: &str, rule: NameRule, allowed: impl Fn(u8) -> bool) -> Result<(), NameError> {
    if value.len() > rule.max() {
        return Err(NameError::TooLong {
            rule,
            len: value.chars().count(),
            max: rule.max(),
        });
    }
    let bytes = value.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return Err(NameError::Empty { rule });
    };
    let ends = first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric();
    if !ends || !bytes.iter().all(|b| allowed(*b)) {
        return Err(NameError::Characters { rule });
    }
    Ok(())
}

fn lowercase_alphanumeric(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// Object names: policies, workloads.
pub fn dns1123_subdomain(value: &str) -> Result<(), NameError> {
    subdomain(value, NameRule::Subdomain)
}

fn subdomain(value: &str, rule: NameRule) -> Result<(), NameError> {
    check(value, rule, |b| {
        lowercase_alphanumeric(b) || b == b'-' || b == b'.'
    })?;
    // Every part between dots is a label: no "a..b", "a.-b".
    if value.split('.').all(|part| {
        part.bytes().next().is_some_and(lowercase_alphanumeric)
            && part.bytes().last().is_some_and(lowercase_alphanumeric)
    }) {
        Ok(())
    } else {
        Err(NameError::Characters { rule })
    }
}

/// Namespace names (and Service names).
pub fn dns1123_label(value: &str) -> Result<(), NameError> {
    check(value, NameRule::Label, |b| {
        lowercase_alphanumeric(b) || b == b'-'
    })
}

fn qualified_part(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// A label key: `[prefix/]name`, the prefix a DNS-1123 subdomain.
pub fn label_key(key: &str) -> Result<(), NameError> {
    let name = match key.split_once('/') {
        None => key,
        Some((_, name)) if name.contains('/') => return Err(NameError::KeySlashes),
        Some((prefix, name)) => {
            subdomain(prefix, NameRule::LabelKeyPrefix)?;
            name
        }
    };
    check(name, NameRule::LabelKeyName, qualified_part)
}

/// A label value: like a key name, but may be empty.
pub fn label_value(value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Ok(());
    }
    check(value, NameRule::LabelValue, qualified_part)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subdomains() {
        let long = format!("{}.{}", "a".repeat(126), "b".repeat(126));
        assert_eq!(long.len(), MAX_SUBDOMAIN);
        for ok in ["a", "web", "web-1", "a.b.c", "0", "default-deny", &long] {
            assert_eq!(dns1123_subdomain(ok), Ok(()), "{ok}");
        }
        for bad in [
            "Web", "-a", "a-", "a..b", "a.-b", "a_b", "a/b", "a b", "é", ".a",
        ] {
            assert_eq!(
                dns1123_subdomain(bad),
                Err(NameError::Characters {
                    rule: NameRule::Subdomain
                }),
                "{bad}"
            );
        }
        assert_eq!(
            dns1123_subdomain(""),
            Err(NameError::Empty {
                rule: NameRule::Subdomain
            })
        );
        assert_eq!(
            dns1123_subdomain(&format!("{long}c")),
            Err(NameError::TooLong {
                rule: NameRule::Subdomain,
                len: 254,
                max: 253
            })
        );
    }

    #[test]
    fn labels() {
        assert_eq!(dns1123_label(&"a".repeat(63)), Ok(()));
        assert!(matches!(
            dns1123_label(&"a".repeat(64)),
            Err(NameError::TooLong {
                len: 64,
                max: 63,
                ..
            })
        ));
        for bad in ["a.b", "A", "-a", "a-", "", "a_b"] {
            assert!(dns1123_label(bad).is_err(), "{bad}");
        }
        assert_eq!(dns1123_label("kube-system"), Ok(()));
    }

    #[test]
    fn label_keys_and_values() {
        for ok in [
            "app",
            "App_Name.v2",
            "kubernetes.io/metadata.name",
            "example.com/Team-A",
            &"k".repeat(63),
            &format!("{}/{}", "p".repeat(253), "n".repeat(63)),
        ] {
            assert_eq!(label_key(ok), Ok(()), "{ok}");
        }
        assert!(matches!(
            label_key(""),
            Err(NameError::Empty {
                rule: NameRule::LabelKeyName
            })
        ));
        assert!(matches!(
            label_key("example.com/"),
            Err(NameError::Empty {
                rule: NameRule::LabelKeyName
            })
        ));
        assert!(matches!(
            label_key("/name"),
            Err(NameError::Empty {
                rule: NameRule::LabelKeyPrefix
            })
        ));
        assert!(matches!(
            label_key("Example.com/name"),
            Err(NameError::Characters {
                rule: NameRule::LabelKeyPrefix
            })
        ));
        assert_eq!(label_key("a/b/c"), Err(NameError::KeySlashes));
        assert!(matches!(
            label_key(&"k".repeat(64)),
            Err(NameError::TooLong {
                rule: NameRule::LabelKeyName,
                ..
            })
        ));
        assert!(matches!(
            label_key("-app"),
            Err(NameError::Characters { .. })
        ));
        assert!(matches!(
            label_key(&format!("{}/n", "p".repeat(254))),
            Err(NameError::TooLong {
                rule: NameRule::LabelKeyPrefix,
                ..
            })
        ));

        for ok in ["", "web", "Web_1.x-y", &"v".repeat(63)] {
            assert_eq!(label_value(ok), Ok(()), "{ok:?}");
        }
        for bad in ["-web", "web.", "a b", "a/b", &"v".repeat(64)] {
            assert!(label_value(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn long_values_are_abbreviated_in_messages() {
        let huge = "a".repeat(10 << 20);
        let shown = abbreviate(&huge);
        assert!(shown.len() < 100, "{shown}");
        assert!(shown.ends_with("(10485760 bytes)"), "{shown}");
        assert_eq!(abbreviate("web"), "web");
    }
}
