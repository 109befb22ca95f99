//! The committed `deploy/crds/kapsa.yaml`, and the Helm chart's copy
//! `charts/kapsa/crds/kapsa.yaml`, must equal `kapsa_api::crds_yaml()` byte
//! for byte. Regenerate both with `make crds`
//! (`KAPSA_UPDATE_CRDS=1 cargo test -p kapsa-api --test crds_drift`).

use std::path::PathBuf;

/// Every committed copy of the CRDs, relative to the repository root.
const COPIES: [&str; 2] = ["deploy/crds/kapsa.yaml", "charts/kapsa/crds/kapsa.yaml"];

fn committed_path(copy: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(copy)
}

#[test]
fn committed_crds_match_generated() {
    let generated = kapsa_api::crds_yaml();
    if std::env::var_os("KAPSA_UPDATE_CRDS").is_some_and(|v| !v.is_empty() && v != "0") {
        for copy in COPIES {
            let path = committed_path(copy);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
            }
            std::fs::write(&path, &generated).unwrap_or_else(|e| panic!("write {copy}: {e}"));
            eprintln!("rewrote {}", path.display());
        }
        return;
    }
    let mut stale = Vec::new();
    for copy in COPIES {
        let committed = std::fs::read_to_string(committed_path(copy)).unwrap_or_default();
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
            stale.push(format!("{copy} ({first_diff})"));
        }
    }
    assert!(
        stale.is_empty(),
        "out of date with kapsa_api::crds_yaml(): {}.\n\
         Run: make crds (KAPSA_UPDATE_CRDS=1 cargo test -p kapsa-api --test crds_drift)",
        stale.join(", ")
    );
}
