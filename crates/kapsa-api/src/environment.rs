//! `Environment`: one running instance of a Project's app.

// kube `printcolumn(...)` attributes repeat `type_ = "string"`, which
// clippy misreads as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::conditions::Condition;
use crate::naming::{
    DNS_NAME_MAX_LEN, MAX_BRANCH_NAME_LEN, MAX_ENVIRONMENT_NAME_LEN, MAX_PROJECT_NAME_LEN,
};
use crate::validation::{
    COMMIT_SHA, DNS_1035_LABEL, DNS_LABEL, DNS_NAME, IMAGE_REFERENCE, MAX_CONDITIONS,
    MAX_IMAGE_LEN, MAX_RELEASE_HISTORY, git_branch_rule, matches_rule,
};

/// Kind of Environment: `Production` (the production branch of a Project,
/// named `production`) or `Preview` (a preview of another branch, named
/// `preview-<branch-slug>`, deleted when the branch goes away or its TTL
/// passes).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum EnvironmentType {
    /// The production environment of a project.
    Production,
    /// A preview environment of a branch.
    Preview,
}

/// Lifecycle phase of an Environment: `Pending`, `Building`, `Deploying`,
/// `Ready` or `Failed`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
pub enum EnvironmentPhase {
    /// Accepted, nothing started yet.
    #[default]
    Pending,
    /// The image for the wanted commit is being built.
    Building,
    /// The image is being rolled out.
    Deploying,
    /// Serving the wanted commit or image.
    Ready,
    /// The last build or rollout failed; see the conditions. The previous
    /// release, if any, keeps serving.
    Failed,
}

/// One running instance of a Project's app: built from a branch (at a
/// commit) or run from a fixed image, with a host and a Deployment.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kapsa.dev",
    version = "v1alpha1",
    kind = "Environment",
    plural = "environments",
    shortname = "env",
    category = "kapsa",
    namespaced,
    status = "EnvironmentStatus",
    derive = "PartialEq",
    label("app.kubernetes.io/part-of", "kapsa"),
    doc = "Environment: one running instance of a Project's app, in the project's namespace: built from a branch (at a commit) or run from a fixed image, served at a host with a Deployment, Service and Ingress of the same name. Kapsa creates `production` and `preview-<branch-slug>` Environments; a person may create others. metadata.name must be a DNS-1035 label (starts with a letter) of at most 63 characters because it names a Service.",
    printcolumn(name = "Project", type_ = "string", json_path = ".spec.project", description = "Project of the environment"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type", description = "Production or Preview"),
    printcolumn(name = "Branch", type_ = "string", json_path = ".spec.branch", description = "Branch built from"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Lifecycle phase"),
    printcolumn(name = "URL", type_ = "string", json_path = ".status.url", description = "Where the environment is served"),
    printcolumn(name = "Commit", type_ = "string", json_path = ".status.commit", description = "Commit deployed", priority = 1),
    printcolumn(name = "Image", type_ = "string", json_path = ".status.image", description = "Image deployed", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new(format!("size(self.metadata.name) <= {MAX_ENVIRONMENT_NAME_LEN}"))
        .message(Message::Message(format!("metadata.name of an Environment must be at most {MAX_ENVIRONMENT_NAME_LEN} characters: it names the Service of the environment (a DNS-1035 label)"))),
    validation = Rule::new(matches_rule("self.metadata.name", DNS_1035_LABEL))
        .message("metadata.name of an Environment must be a DNS-1035 label (lower-case [a-z0-9-], starting with a letter, not ending with '-'): it names the Service of the environment")
)]
#[x_kube(
    validation = Rule::new("has(self.branch) != has(self.image)")
        .message("exactly one of spec.branch (optionally with spec.commit) or spec.image must be set"),
    validation = Rule::new("!has(self.commit) || has(self.branch)")
        .message("spec.commit is only allowed together with spec.branch")
        .field_path(".commit")
        .reason(Reason::FieldValueForbidden)
)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentSpec {
    /// Name of the Project this Environment belongs to, e.g. `shop`. The
    /// Environment must be in that project's namespace. A DNS label of at
    /// most 40 characters. Immutable.
    #[schemars(length(min = 1, max = MAX_PROJECT_NAME_LEN))]
    #[x_kube(
        validation = Rule::new(matches_rule("self", DNS_LABEL))
            .message("spec.project must be a Project name: a DNS label (lower-case [a-z0-9-], not starting or ending with '-')"),
        validation = Rule::new("self == oldSelf").message("spec.project is immutable")
    )]
    pub project: String,

    /// `Production` or `Preview`. Immutable.
    #[serde(rename = "type")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.type is immutable"))]
    pub type_: EnvironmentType,

    /// Git branch to build from, e.g. `main` or `feature/login`. Exactly one
    /// of `branch` and `image` is set. A branch name as `git
    /// check-ref-format --branch` accepts it, without the `refs/heads/`
    /// prefix (names starting with `refs/` and the name `@` are refused), at
    /// most 255 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_BRANCH_NAME_LEN))]
    #[x_kube(validation = Rule::new(git_branch_rule("self"))
        .message("spec.branch must be a valid git branch name without refs/heads/: no spaces, control characters, '..', '//', '@{', or any of ~^:?*[\\; no component starting with '.' or ending with '.lock'; must not start with '-', '/' or '.', nor end with '/' or '.', nor be HEAD or @, nor start with refs/"))]
    pub branch: Option<String>,

    /// Commit of `branch` to build and run: a full 40-character (SHA-1) or
    /// 64-character (SHA-256) lower-case hex SHA. Only with `branch`.
    /// Optional: the operator sets it to the branch head; set it yourself to
    /// pin (or roll back to) a commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 40, max = 64))]
    #[x_kube(validation = Rule::new(matches_rule("self", COMMIT_SHA))
        .message("spec.commit must be a full commit SHA: 40 or 64 lower-case hex digits"))]
    pub commit: Option<String>,

    /// Container image to run as is, with no build, e.g.
    /// `nginx:1.27` or `harbor.example.com/shop/api@sha256:<digest>`.
    /// Exactly one of `branch` and `image` is set. At most 512 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_IMAGE_LEN))]
    #[x_kube(validation = Rule::new(matches_rule("self", IMAGE_REFERENCE))
        .message("spec.image must be an image reference [host[:port]/]path[:tag][@sha256:digest] with a lower-case path, e.g. nginx:1.27 or harbor.example.com/shop/api:v1"))]
    pub image: Option<String>,

    /// Host the Environment is served at, e.g. `shop.apps.example.com`.
    /// Optional: the operator sets it (production `<project>.<base>`,
    /// previews `<branch-slug>.<project>.<base>`). A host under a DomainPool
    /// base belongs to exactly one Project; a host of another project is
    /// refused (a condition says so). A lower-case DNS name with at least
    /// two labels, at most 253 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = DNS_NAME_MAX_LEN))]
    #[x_kube(validation = Rule::new(matches_rule("self", DNS_NAME))
        .message("spec.host must be a lower-case DNS name with at least two labels, e.g. shop.apps.example.com; each label 1-63 characters of [a-z0-9-], not starting or ending with '-'"))]
    pub host: Option<String>,

    /// When the Environment expires and is deleted (RFC 3339), for
    /// previews: when Kapsa first saw the branch at `commit`, plus the
    /// project's preview TTL. Set by the operator; absent means never (and
    /// for a preview annotated `kapsa.dev/keep: "true"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,

    /// Hold a release back (a rollback): while set, Kapsa runs this release
    /// and nothing newer. New commits are still built, but not rolled out;
    /// the `Pinned` condition names the release held and what waits.
    /// Remove it (`kapsa unpin`) to roll out the newest build again. Set by
    /// a person (`kapsa rollback`); Kapsa never sets or clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<Pin>,
}

/// What a pinned Environment runs: exactly one of `release` and `image`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("has(self.release) != has(self.image)")
    .message("spec.pin needs exactly one of release (a number from status.history) or image"))]
#[serde(rename_all = "camelCase")]
pub struct Pin {
    /// A release of `status.history`, by its `number`, e.g. `3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub release: Option<i64>,

    /// An image to run as is, e.g.
    /// `harbor.example.com/kapsa/shop@sha256:<digest>`. At most 512
    /// characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_IMAGE_LEN))]
    #[x_kube(validation = Rule::new(matches_rule("self", IMAGE_REFERENCE))
        .message("spec.pin.image must be an image reference [host[:port]/]path[:tag][@sha256:digest] with a lower-case path"))]
    pub image: Option<String>,
}

/// Observed state of an Environment, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentStatus {
    /// The `metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Lifecycle phase: `Pending`, `Building`, `Deploying`, `Ready` or
    /// `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<EnvironmentPhase>,

    /// URL the Environment is served at, e.g. `https://shop.apps.example.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,

    /// Commit deployed now (for branch environments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,

    /// Image deployed now, by digest where known, e.g.
    /// `harbor.example.com/kapsa/shop@sha256:<digest>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Recent releases, newest first, at most 10: what was deployed when,
    /// for rollbacks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RELEASE_HISTORY))]
    pub history: Vec<Release>,

    /// Current state of the Environment. Condition types: `Built` (the image
    /// for the wanted commit exists), `Deployed` (the Deployment runs it and
    /// is available), `TLSReady` (the certificate for the host is ready),
    /// `ReferencesResolved` (every configMapRef and secretRef exists),
    /// `Ready` (it serves), `Applied` (the API server accepted every object
    /// Kapsa applies for it; False names what was refused and why).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_CONDITIONS))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// One release of an Environment: an image that was rolled out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Release {
    /// The release's number: 1 for the first, one more for each release
    /// after it (a rollback is a release too). `spec.pin.release` names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<i64>,

    /// Commit the image was built from (absent for fixed images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,

    /// Image that was deployed, by digest where known.
    pub image: String,

    /// When the rollout of this release completed.
    pub deployed_at: Time,
}
