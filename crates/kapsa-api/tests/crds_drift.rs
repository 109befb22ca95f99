//! The committed `deploy/crds/kapsa.yaml` must equal `kapsa_api::crds_yaml()`
//! byte for byte. Regenerate it with
//! `KAPSA_UPDATE_CRDS=1 cargo test -p kapsa-api --test crds_drift`.

use std::path::PathBuf;

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds/kapsa.yaml")
}

#[test]
fn committed_crds_match_generated() {
    let generated = kapsa_api::crds_yaml();
    let path = committed_path();
    if std::env::var_os("KAPSA_UPDATE_CRDS").is_some_and(|v| !v.is_empty() && v != "0") {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("create deploy/crds");
        }
        std::fs::write(&path, &generated).expect("write deploy/crds/kapsa.yaml");
        eprintln!("rewrote {}", path.display());
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let first_diff = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || {
                    format!(
                        "lengths differ ({} vs {} lines)",
                        committed.lines().count(),
                        generated.lines().count()
                    )
                },
                |i| format!("first difference at line {}", i + 1),
            );
        panic!(
            "deploy/crds/kapsa.yaml is out of date with kapsa_api::crds_yaml() ({first_diff}).\n\
             Run: KAPSA_UPDATE_CRDS=1 cargo test -p kapsa-api --test crds_drift"
        );
    }
}
