//! The real lane's BuildKit (docs/real-lane.md): a rootless BuildKit image
//! like the upstream `moby/buildkit:<version>-rootless`, built by
//! `hack/install-buildkit.sh` from BuildKit's and RootlessKit's Go modules
//! (and Debian's git, runc, newuidmap and busybox), pushed to the real
//! node's registry. Kapsa's Dockerfile build Jobs run it on the real node
//! (`--buildkit-image`).

use std::path::{Path, PathBuf};

use crate::control_plane::Result;
use crate::real_node::ImagePusher;

/// The image's tag in the lane's registry (its version, as upstream tags).
pub const IMAGE_TAG: &str = "v0.26.2-rootless";

/// The folder `hack/install-buildkit.sh` fills: `KAPSA_BUILDKIT` if it is
/// complete, otherwise the script builds it (once per machine).
pub fn find_buildkit() -> Result<PathBuf> {
    folder(false)
}

/// [`find_buildkit`] that builds nothing: an error unless it is built.
pub fn built_buildkit() -> Result<PathBuf> {
    folder(true)
}

fn folder(cached_only: bool) -> Result<PathBuf> {
    crate::control_plane::installed_folder_with(
        std::env::var_os("KAPSA_BUILDKIT").map(PathBuf::from),
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hack/install-buildkit.sh"),
        |dir| dir.join("rootfs.tar").is_file() && dir.join("IMAGE.env").is_file(),
        "BuildKit",
        None,
        cached_only,
    )
}

/// Pushes the image of `folder` to the lane's registry as
/// `<registry>/kapsa-lane/buildkit:<IMAGE_TAG>`, user 1000 and the
/// environment of `IMAGE.env`, as upstream; returns it by digest.
pub fn push_image(images: &ImagePusher, folder: &Path) -> Result<String> {
    let env = std::fs::read_to_string(folder.join("IMAGE.env"))?
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect::<Vec<_>>();
    images.push_layer(
        &format!("{}/kapsa-lane/buildkit:{IMAGE_TAG}", images.registry()),
        &folder.join("rootfs.tar"),
        &["rootlesskit", "buildkitd"],
        Some("1000:1000"),
        &env,
    )
}
