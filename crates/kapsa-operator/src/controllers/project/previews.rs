//! The preview part of the Project plan: which branches get a preview
//! Environment, which lose theirs, and what the Project's status says about
//! them. Pure: everything comes from the last poll, the cached Environments
//! and the status written last time.
//!
//! The rules, in order, for each branch that qualifies (`branches` globs,
//! never the production branch):
//! - **merged**: the production branch contains its head (the poller's
//!   bounded merge check) → no preview (`Merged`); an existing one is deleted;
//! - **expired**: the head was first seen more than `ttl` ago (and the
//!   preview has no `kapsa.dev/keep: "true"`) → no preview (`Expired`, with
//!   the commit): only a new commit brings it back. Expiry is written to the
//!   status first and the Environment deleted on the next pass, so a restart
//!   in between cannot re-create it;
//! - **invalid name**: git allows names an Environment cannot hold (longer
//!   than 255 characters): left out (`InvalidBranchName`);
//! - the rest compete for `maxEnvironments` places: previews that exist
//!   first, then the head seen most recently, then the branch name.
//!
//! Names: a preview keeps the name it was created with. A new one is
//! `preview-<readable slug>` (`feature/login` → `preview-feature-login`, at
//! `feature-login.<project>.<base>`) unless an Environment already has that
//! name or another branch took it first (`Feature/Login`), or the slug
//! would have to be truncated; then `preview-<slug>-<hash of the branch
//! name>`, which no other branch can have. If both are taken (an Environment
//! Kapsa did not make), the branch is left out (`NameTaken`).
//!
//! A branch that is deleted loses its preview at once. While the repository
//! cannot be listed, nothing changes: no preview is created, expired or
//! deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kapsa_api::naming::{
    PREVIEW_ENVIRONMENT_PREFIX, hashed_branch_slug, is_preview_branch, preview_slug,
};
use kapsa_api::project::{
    DEFAULT_PREVIEW_TTL, HEAD_SEEN_AT_ANNOTATION, KEEP_ANNOTATION, MAX_PREVIEWS_LEFT_OUT,
    PreviewLeftOut, PreviewLeftOutReason, PreviewSummary, ProjectStatus,
};
use kapsa_api::{Environment, EnvironmentType, Project};
use kube::ResourceExt;

use crate::children::ChildKey;
use crate::context::PollResult;
use crate::status::PlannedEvent;

/// How soon the plan looks again after recording an expiry (the deletion
/// follows on that pass).
const EXPIRY_FOLLOW_UP: Duration = Duration::from_secs(1);

/// The preview part of a Project plan.
#[derive(Clone, Debug, Default)]
pub struct PreviewPlan {
    /// The preview Environments wanted, as they are to be applied.
    pub apply: Vec<Environment>,
    /// Preview Environments left exactly as they are this pass.
    pub keep: Vec<ChildKey>,
    pub previews: Vec<PreviewSummary>,
    pub left_out: Vec<PreviewLeftOut>,
    pub events: Vec<PlannedEvent>,
    /// When the plan must look again (the next expiry), if ever.
    pub wake: Option<Duration>,
}

/// The inputs of [`plan_previews`].
pub struct PreviewInputs<'a> {
    pub project: &'a Project,
    pub poll: Option<&'a PollResult>,
    /// The Project's Environments in its namespace.
    pub environments: &'a [Arc<Environment>],
    /// The status as written last time.
    pub before: &'a ProjectStatus,
    /// The base domain the Project serves from after this plan, if any.
    pub base_domain: Option<&'a str>,
    pub now: &'a Time,
}

/// Whether `env` is a preview this Project made (its controller).
pub fn is_kapsa_preview(project: &Project, env: &Environment) -> bool {
    env.spec.type_ == EnvironmentType::Preview
        && env.name_any().starts_with(PREVIEW_ENVIRONMENT_PREFIX)
        && env.owner_references().iter().any(|o| {
            o.controller == Some(true)
                && o.kind == "Project"
                && Some(&o.uid) == project.metadata.uid.as_ref()
        })
}

/// The TTL of previews (`spec.previewEnvironments.ttl`).
fn ttl(project: &Project) -> SignedDuration {
    let ttl = kapsa_api::duration::parse(&project.spec.preview_environments.ttl)
        .or_else(|| kapsa_api::duration::parse(DEFAULT_PREVIEW_TTL))
        .unwrap_or(Duration::from_secs(72 * 3600));
    SignedDuration::try_from(ttl).unwrap_or(SignedDuration::MAX)
}

fn seen_at(env: &Environment) -> Option<Timestamp> {
    env.annotations()
        .get(HEAD_SEEN_AT_ANNOTATION)?
        .parse::<Timestamp>()
        .ok()
}

fn kept(env: &Environment) -> bool {
    env.annotations().get(KEEP_ANNOTATION).map(String::as_str) == Some("true")
}

/// A time to whole seconds (what an RFC 3339 field of Kubernetes keeps).
fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

struct Candidate<'a> {
    branch: &'a str,
    head: &'a str,
    seen: Timestamp,
    existing: Option<&'a Environment>,
    keep: bool,
}

pub fn plan_previews(inputs: &PreviewInputs<'_>) -> PreviewPlan {
    let project = inputs.project;
    let spec = &project.spec.preview_environments;
    let now = whole_seconds(inputs.now.0);
    let mine: BTreeMap<String, &Environment> = inputs
        .environments
        .iter()
        .filter(|e| is_kapsa_preview(project, e))
        .map(|e| (e.name_any(), e.as_ref()))
        .collect();
    // The preview of each branch (one: a second for the same branch is pruned).
    let mut by_branch: BTreeMap<&str, &Environment> = BTreeMap::new();
    for env in mine.values() {
        if let Some(branch) = env.spec.branch.as_deref() {
            by_branch.entry(branch).or_insert(env);
        }
    }
    let mut plan = PreviewPlan::default();
    if !spec.enabled {
        // Disabling previews deletes them (they are not applied, so pruned).
        for (name, env) in &mine {
            plan.events.push(PlannedEvent::normal(
                "PreviewDeleted",
                format!(
                    "{name} ({}) deleted: previews were disabled",
                    env.spec.branch.clone().unwrap_or_default()
                ),
            ));
        }
        return plan;
    }
    let listing = inputs
        .poll
        .filter(|p| p.error.is_none())
        .and_then(|p| p.branches.as_ref());
    let Some(branches) = listing else {
        // Not listed (yet, or the repository fails): everything stays.
        plan.keep = mine.values().map(|e| key(e)).collect();
        plan.previews = mine.values().map(|e| summary(e, None)).collect();
        plan.left_out = inputs.before.previews_left_out.clone();
        return plan;
    };
    let merged: BTreeSet<&str> = inputs
        .poll
        .and_then(|p| p.merged.as_ref())
        .map(|m| m.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let recorded = |branch: &str, head: &str| {
        inputs
            .before
            .previews_left_out
            .iter()
            .find(|l| l.branch == branch && l.commit.as_deref() == Some(head))
    };
    let ttl = ttl(project);
    let production = &project.spec.source.git.branch;
    let mut candidates: Vec<Candidate<'_>> = Vec::new();
    let mut left_out: Vec<PreviewLeftOut> = Vec::new();
    let mut wake: Option<Duration> = None;
    let mut wake_at = |at: Duration| wake = Some(wake.map_or(at, |w| w.min(at)));
    let left = |branch: &str, reason, head: &str, seen: Timestamp| PreviewLeftOut {
        branch: branch.to_string(),
        reason,
        commit: Some(head.to_string()),
        head_seen_at: Some(Time(seen)),
    };
    for (branch, head) in branches {
        if !is_preview_branch(&spec.branches, production, branch) {
            continue;
        }
        if !kapsa_api::validation::is_valid_branch_name(branch) {
            // Git allows it; an Environment cannot hold it.
            left_out.push(left(
                branch,
                PreviewLeftOutReason::InvalidBranchName,
                head,
                now,
            ));
            continue;
        }
        let existing = by_branch.get(branch.as_str()).copied();
        let previous = recorded(branch, head);
        let seen = existing
            .filter(|e| e.spec.commit.as_deref() == Some(head.as_str()))
            .and_then(seen_at)
            .or_else(|| previous.and_then(|l| l.head_seen_at.as_ref()).map(|t| t.0))
            .unwrap_or(now);
        // While the merge check has no answer (it failed, or the server
        // cannot answer it), a branch recorded as merged at this head stays
        // merged: no preview flaps back for one failed check.
        let merge_unknown = inputs.poll.is_some_and(|p| p.merged.is_none());
        let was_merged = previous.is_some_and(|l| l.reason == PreviewLeftOutReason::Merged);
        if merged.contains(branch.as_str()) || (merge_unknown && was_merged) {
            if let Some(env) = existing {
                plan.events.push(PlannedEvent::normal(
                    "PreviewMerged",
                    format!(
                        "{} deleted: {production} contains {branch} at {head}",
                        env.name_any()
                    ),
                ));
            }
            left_out.push(left(branch, PreviewLeftOutReason::Merged, head, seen));
            continue;
        }
        let keep = existing.is_some_and(kept);
        if previous.is_some_and(|l| l.reason == PreviewLeftOutReason::Expired) && !keep {
            // Expired at this head before: the Environment (if still there)
            // goes now; only a new commit brings it back.
            left_out.push(left(branch, PreviewLeftOutReason::Expired, head, seen));
            continue;
        }
        let expires = seen.checked_add(ttl).unwrap_or(Timestamp::MAX);
        if !keep && now >= expires {
            left_out.push(left(branch, PreviewLeftOutReason::Expired, head, seen));
            if let Some(env) = existing {
                // Recorded first, deleted on the next pass.
                plan.keep.push(key(env));
                plan.events.push(PlannedEvent::normal(
                    "PreviewExpired",
                    format!(
                        "{} expired: no commit on {branch} since {seen} (ttl {})",
                        env.name_any(),
                        spec.ttl
                    ),
                ));
                wake_at(EXPIRY_FOLLOW_UP);
            }
            continue;
        }
        candidates.push(Candidate {
            branch,
            head,
            seen,
            existing,
            keep,
        });
    }
    // Places: existing previews first, then the most recently seen head,
    // then the branch name.
    candidates.sort_by(|a, b| {
        b.existing
            .is_some()
            .cmp(&a.existing.is_some())
            .then(b.seen.cmp(&a.seen))
            .then(a.branch.cmp(b.branch))
    });
    let places = usize::try_from(spec.max_environments.max(0)).unwrap_or(0);
    let mut names: BTreeSet<String> = inputs.environments.iter().map(|e| e.name_any()).collect();
    for (rank, c) in candidates.iter().enumerate() {
        if rank >= places {
            if let Some(env) = c.existing {
                plan.events.push(PlannedEvent::normal(
                    "PreviewDeleted",
                    format!(
                        "{} deleted: more than maxEnvironments ({}) previews",
                        env.name_any(),
                        spec.max_environments
                    ),
                ));
            }
            left_out.push(left(
                c.branch,
                PreviewLeftOutReason::LimitReached,
                c.head,
                c.seen,
            ));
            continue;
        }
        let expires = (!c.keep).then(|| c.seen.checked_add(ttl).unwrap_or(Timestamp::MAX));
        if let Some(expires) = expires {
            let left = expires.duration_since(now);
            wake_at(Duration::try_from(left).unwrap_or_default() + Duration::from_secs(1));
        }
        let slug = match c.existing {
            Some(env) => env.name_any()[PREVIEW_ENVIRONMENT_PREFIX.len()..].to_string(),
            None => {
                let free =
                    |slug: &String| !names.contains(&format!("{PREVIEW_ENVIRONMENT_PREFIX}{slug}"));
                let Some(slug) = Some(preview_slug(c.branch))
                    .filter(free)
                    .or_else(|| Some(hashed_branch_slug(c.branch)).filter(free))
                else {
                    left_out.push(left(
                        c.branch,
                        PreviewLeftOutReason::NameTaken,
                        c.head,
                        c.seen,
                    ));
                    continue;
                };
                names.insert(format!("{PREVIEW_ENVIRONMENT_PREFIX}{slug}"));
                slug
            }
        };
        let env = crate::resources::project::preview_environment(
            project,
            &slug,
            c.branch,
            c.head,
            inputs.base_domain,
            c.seen,
            expires,
        );
        // Announced once: a preview the status lists already was announced
        // (the Environment cache may lag behind its creation).
        let announced = inputs
            .before
            .previews
            .iter()
            .any(|p| p.environment == env.name_any());
        match c.existing {
            None if announced => {}
            None => plan.events.push(PlannedEvent::normal(
                "PreviewCreated",
                format!("{} for {} at {}", env.name_any(), c.branch, c.head),
            )),
            Some(old) if old.spec.commit.as_deref() != Some(c.head) => {
                plan.events.push(PlannedEvent::normal(
                    "PreviewUpdated",
                    format!("{} follows {} to {}", env.name_any(), c.branch, c.head),
                ));
            }
            Some(_) => {}
        }
        plan.previews.push(summary(&env, c.existing));
        plan.apply.push(env);
    }
    // Previews whose branch is gone.
    for (name, env) in &mine {
        let branch = env.spec.branch.clone().unwrap_or_default();
        let announced = inputs
            .before
            .previews
            .iter()
            .any(|p| &p.environment == name);
        if !branches.contains_key(&branch) && announced {
            plan.events.push(PlannedEvent::normal(
                "PreviewDeleted",
                format!("{name} deleted: branch {branch} was deleted"),
            ));
        }
    }
    // Bounded: expiries are kept first (they are what stops a re-creation).
    left_out.sort_by_key(|l| (l.reason != PreviewLeftOutReason::Expired, l.branch.clone()));
    left_out.truncate(MAX_PREVIEWS_LEFT_OUT);
    left_out.sort_by(|a, b| a.branch.cmp(&b.branch));
    plan.previews.sort_by(|a, b| a.branch.cmp(&b.branch));
    plan.left_out = left_out;
    plan.wake = wake;
    plan
}

fn key(env: &Environment) -> ChildKey {
    crate::children::Observed::typed(env).key
}

/// The status line of a preview: the wanted object's spec, the cached
/// object's status.
fn summary(env: &Environment, cached: Option<&Environment>) -> PreviewSummary {
    let status = cached.or(Some(env)).and_then(|e| e.status.as_ref());
    PreviewSummary {
        branch: env.spec.branch.clone().unwrap_or_default(),
        environment: env.name_any(),
        commit: env.spec.commit.clone(),
        url: status.and_then(|s| s.url.clone()),
        phase: status.and_then(|s| s.phase),
        expires_at: env.spec.expires_at.clone(),
    }
}
