use std::path::Path;

use super::*;

#[test]
fn committed_crds_are_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    for (name, fresh) in generate().unwrap() {
        let committed = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
        assert!(
            committed == fresh,
            "deploy/crds/{name} is out of date: run cargo xtask crdgen"
        );
    }
}

#[test]
fn crds_are_structural_and_carry_the_constraints() {
    let cluster = serde_json::to_value(ClusterL4Policy::crd()).unwrap();
    let version = &cluster["spec"]["versions"][0];
    assert_eq!(cluster["spec"]["scope"], "Cluster");
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["properties"]["priority"]["minimum"], 0.0);
    assert_eq!(spec["properties"]["priority"]["maximum"], 1000.0);
    assert!(spec["x-kubernetes-validations"][0]["rule"]
        .as_str()
        .unwrap()
        .contains("Pass"));
    let text = serde_json::to_string(&cluster).unwrap();
    assert!(
        !text.contains("additionalProperties\":false"),
        "structural schemas cannot forbid unknown fields"
    );
    let l4 = serde_json::to_value(L4Policy::crd()).unwrap();
    assert_eq!(l4["spec"]["scope"], "Namespaced");
    let spec = &l4["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["required"][0], "podSelector");
}

#[test]
fn api_objects_convert_to_policies() {
    let l4: L4Policy = serde_saphyr::from_str(
        "apiVersion: portcullis.dev/v1alpha1\nkind: L4Policy\nmetadata: {name: web, namespace: x}\nspec:\n  podSelector: {}\n  mode: Audit\n  egressDeny: [{ports: [{port: 81}]}]\n",
    )
    .unwrap();
    let policy = l4.to_policy().unwrap();
    assert_eq!(policy.reference, model::PolicyRef::l4_policy("x", "web"));
    let cluster: ClusterL4Policy = serde_saphyr::from_str(
        "apiVersion: portcullis.dev/v1alpha1\nkind: ClusterL4Policy\nmetadata: {name: z}\nspec: {tier: Baseline, priority: 3, ingress: [{action: Pass}]}\n",
    )
    .unwrap();
    let err = cluster.to_policy().unwrap_err().to_string();
    assert!(err.contains("spec.ingress[0].action"), "{err}");
}

#[test]
fn both_kinds_have_a_status_subresource_with_keyed_conditions() {
    for crd in [L4Policy::crd(), ClusterL4Policy::crd()] {
        let crd = serde_json::to_value(crd).unwrap();
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["subresources"]["status"], serde_json::json!({}));
        let conditions = &version["schema"]["openAPIV3Schema"]["properties"]["status"]
            ["properties"]["conditions"];
        // Server-side apply then owns our condition, not the whole list.
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(conditions["x-kubernetes-list-map-keys"][0], "type");
        assert_eq!(conditions["items"]["required"][0], "lastTransitionTime");
    }
}
