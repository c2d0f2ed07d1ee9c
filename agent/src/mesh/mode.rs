//! Which pods are in the mesh, and how strictly: a pod label, else a
//! namespace label, `portcullis.dev/mtls: strict | permissive | disabled`.

use std::fmt;

use portcullis_common::{ENDPOINT_FLAG_MESHED, ENDPOINT_FLAG_MESH_STRICT};

use crate::policy::model::{Inventory, Workload};

/// The label naming a pod's (or a namespace's) mode.
pub const MODE_LABEL: &str = "portcullis.dev/mtls";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MeshMode {
    /// Not in the mesh: plaintext, as without Portcullis's proxies.
    #[default]
    Disabled,
    /// Meshed peers talk mutual TLS; plaintext from others is accepted.
    Permissive,
    /// Only mutual TLS reaches the pod's applications (and the node).
    Strict,
}

impl MeshMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::Permissive => "permissive",
            Self::Strict => "strict",
        }
    }

    pub fn is_meshed(self) -> bool {
        self != Self::Disabled
    }

    /// The endpoint flags the kernel acts on.
    pub fn endpoint_flags(self) -> u32 {
        match self {
            Self::Disabled => 0,
            Self::Permissive => ENDPOINT_FLAG_MESHED,
            Self::Strict => ENDPOINT_FLAG_MESHED | ENDPOINT_FLAG_MESH_STRICT,
        }
    }
}

impl fmt::Display for MeshMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{object}: label {MODE_LABEL}={value:?} is not strict, permissive or disabled; \
     treated as strict (no plaintext) until it is fixed"
)]
pub struct ModeError {
    /// `namespace shop` or `pod shop/web`.
    pub object: String,
    pub value: String,
}

impl std::str::FromStr for MeshMode {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value.to_ascii_lowercase().as_str() {
            "strict" => Ok(Self::Strict),
            "permissive" => Ok(Self::Permissive),
            "disabled" => Ok(Self::Disabled),
            _ => Err(format!(
                "{value:?}: expected strict, permissive or disabled"
            )),
        }
    }
}

fn parse(value: &str, object: impl FnOnce() -> String) -> Result<MeshMode, ModeError> {
    value.parse().map_err(|_| ModeError {
        object: object(),
        value: value.into(),
    })
}

/// A workload's mode: its own label wins over its namespace's. A value
/// that is none of the three fails closed: the pod is STRICT and the
/// error says so.
pub fn of_workload(inventory: &Inventory, workload: &Workload) -> (MeshMode, Option<ModeError>) {
    let namespace_mode = inventory
        .namespaces
        .iter()
        .find(|n| n.name == workload.namespace)
        .and_then(|n| n.labels.get(MODE_LABEL));
    decide(workload, namespace_mode.map(String::as_str))
}

/// The namespaces' mode labels, looked up once for a pass that decides
/// many workloads' modes (the mesh plan, the map contents, the flow
/// namer): searching the namespace list per workload was a quarter of
/// working out the map contents at a thousand local pods.
/// Sorted by namespace, so two passes' labels compare as they are.
#[derive(Debug, PartialEq, Eq)]
pub struct NamespaceModes<'a>(Vec<(&'a str, &'a str)>);

impl<'a> NamespaceModes<'a> {
    pub fn of(inventory: &'a Inventory) -> Self {
        let mut labels: Vec<(&str, &str)> = inventory
            .namespaces
            .iter()
            .filter_map(|n| Some((n.name.as_str(), n.labels.get(MODE_LABEL)?.as_str())))
            .collect();
        labels.sort_unstable();
        Self(labels)
    }

    /// (namespace, its mode label), by namespace.
    pub fn labels(&self) -> &[(&'a str, &'a str)] {
        &self.0
    }

    /// As [`of_workload`].
    pub fn of_workload(&self, workload: &Workload) -> (MeshMode, Option<ModeError>) {
        let label = self
            .0
            .binary_search_by_key(&workload.namespace.as_str(), |(name, _)| name)
            .ok()
            .map(|at| self.0[at].1);
        decide(workload, label)
    }
}

fn decide(workload: &Workload, namespace_mode: Option<&str>) -> (MeshMode, Option<ModeError>) {
    let decided = match (workload.labels.get(MODE_LABEL), namespace_mode) {
        (Some(v), _) => parse(v, || format!("pod {}", workload.reference())),
        (None, Some(v)) => parse(v, || format!("namespace {}", workload.namespace)),
        (None, None) => Ok(MeshMode::Disabled),
    };
    match decided {
        Ok(mode) => (mode, None),
        Err(e) => (MeshMode::Strict, Some(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::Namespace;

    fn workload(labels: &[(&str, &str)]) -> Workload {
        serde_json::from_value(serde_json::json!({
            "name": "web", "namespace": "shop",
            "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_,_>>(),
        }))
        .unwrap()
    }

    fn inventory(ns_mode: Option<&str>) -> Inventory {
        let mut ns = Namespace {
            name: "shop".into(),
            labels: Default::default(),
        };
        if let Some(m) = ns_mode {
            ns.labels.insert(MODE_LABEL.into(), m.into());
        }
        Inventory {
            namespaces: vec![ns],
            ..Default::default()
        }
    }

    #[test]
    fn the_pod_label_wins_over_the_namespace_label() {
        let inv = inventory(Some("strict"));
        assert_eq!(of_workload(&inv, &workload(&[])).0, MeshMode::Strict);
        let w = workload(&[(MODE_LABEL, "permissive")]);
        assert_eq!(of_workload(&inv, &w).0, MeshMode::Permissive);
        let w = workload(&[(MODE_LABEL, "disabled")]);
        assert_eq!(of_workload(&inv, &w).0, MeshMode::Disabled);
        assert_eq!(
            of_workload(&inventory(None), &workload(&[])).0,
            MeshMode::Disabled
        );
    }

    #[test]
    fn an_unknown_mode_fails_closed_as_strict_and_names_the_object() {
        let (mode, err) = of_workload(&inventory(Some("strcit")), &workload(&[]));
        assert_eq!(mode, MeshMode::Strict);
        let msg = err.unwrap().to_string();
        assert!(
            msg.contains("namespace shop") && msg.contains("strcit"),
            "{msg}"
        );
        let (mode, err) = of_workload(&inventory(None), &workload(&[(MODE_LABEL, "off")]));
        assert_eq!(mode, MeshMode::Strict);
        assert!(err.unwrap().to_string().contains("pod shop/web"));
    }

    #[test]
    fn a_pass_decides_every_mode_as_one_workload_at_a_time_would() {
        let pods = [
            workload(&[]),
            workload(&[(MODE_LABEL, "permissive")]),
            workload(&[(MODE_LABEL, "off")]),
        ];
        for ns_mode in [None, Some("strict"), Some("disabled"), Some("strcit")] {
            let inv = inventory(ns_mode);
            let modes = NamespaceModes::of(&inv);
            for w in &pods {
                let (alone, alone_err) = of_workload(&inv, w);
                let (in_pass, pass_err) = modes.of_workload(w);
                assert_eq!(
                    (alone, alone_err.map(|e| e.to_string())),
                    (in_pass, pass_err.map(|e| e.to_string())),
                    "{ns_mode:?} {:?}",
                    w.labels
                );
            }
        }
    }

    #[test]
    fn flags_tell_the_kernel_meshed_and_strict() {
        assert_eq!(MeshMode::Disabled.endpoint_flags(), 0);
        assert_eq!(MeshMode::Permissive.endpoint_flags(), ENDPOINT_FLAG_MESHED);
        assert_eq!(
            MeshMode::Strict.endpoint_flags(),
            ENDPOINT_FLAG_MESHED | ENDPOINT_FLAG_MESH_STRICT
        );
    }
}
