//! Which branch heads the production branch already contains: the merge
//! check of preview environments.
//!
//! Not implemented yet (a placeholder with the final signature).

use std::collections::BTreeSet;

use super::{GitCredentials, GitError, ListOptions};

/// How many commits of the production branch's history are examined.
pub const MERGE_CHECK_DEPTH: u32 = 200;

/// The commits of `heads` that `production_head` contains (is equal to or a
/// descendant of), looking at most `depth` commits back from it.
pub async fn contained_in(
    _url: &str,
    _credentials: Option<&GitCredentials>,
    _options: &ListOptions,
    _production_head: &str,
    _heads: &BTreeSet<String>,
    _depth: u32,
) -> Result<BTreeSet<String>, GitError> {
    Ok(BTreeSet::new())
}
