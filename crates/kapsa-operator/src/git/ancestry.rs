//! Which branch heads the production branch already contains: the merge
//! check of preview environments.
//!
//! A preview is deleted when its branch is merged, that is when the
//! branch's head is reachable from the production branch's head. Kapsa never
//! clones: [`contained_in`] sends one git protocol v2 `fetch` request for the
//! production head's last `depth` commits, without their trees and files
//! (`want <head>`, `deepen <depth>`, `filter tree:0`, `done`), reads the
//! pack of commit objects that comes back in memory (gix's pack entry
//! iterator, the deltas resolved here), and walks the parents from the
//! production head. Nothing is written to disk but the scratch repository
//! gix's HTTP options hang on.
//!
//! The connection is [`list_branches`](super::list_branches)'s: the same
//! host policy and address pinning, no redirect, credentials only for the
//! URL's own origin, ssh through the system `ssh` (killed on timeout), and
//! [`ListOptions::timeout`] for all of it. At most
//! [`MAX_MERGE_CHECK_BYTES`] are read (or `options.max_bytes`, if lower).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::io::BufRead;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gix::{
    ObjectId,
    bstr::ByteSlice,
    odb::pack::data::{
        entry::Header,
        input::{BytesToEntriesIter, EntryDataMode, Mode},
    },
    protocol::{
        fetch::Response,
        transport::{
            Protocol, Service,
            client::{TransportWithoutIO, blocking_io::TransportV2Ext},
        },
    },
};

use super::{
    GitCredentials, GitError, ListOptions,
    error::bounded,
    limits::MAX_MERGE_CHECK_BYTES,
    remote::{self, Failure, Session},
};

/// How many commits of the production branch's history are examined.
pub const MERGE_CHECK_DEPTH: u32 = 200;

/// The largest commit object accepted, decompressed.
const MAX_COMMIT_BYTES: u64 = 1024 * 1024;

/// The most bytes decompressed from one pack, all objects together (the
/// pack itself is at most [`MAX_MERGE_CHECK_BYTES`]).
const MAX_INFLATED_BYTES: u64 = 64 * 1024 * 1024;

/// The filter that leaves out every tree and file: commits only.
const COMMITS_ONLY: &str = "tree:0";

/// The commits of `heads` that `production_head` contains (is equal to or a
/// descendant of), looking at most `depth` commits back from it.
///
/// - Reachability is real: through every parent of merge commits, not only
///   the first, so a branch merged with a merge commit, fast-forwarded, or
///   created from the production branch without commits of its own is
///   contained; a branch with a commit the production branch lacks is not.
/// - The bound: a head is found only if a path of fewer than `depth`
///   parent links leads to it from `production_head` (`depth` 1, and 0, mean
///   the head itself only). An older head counts as not contained.
/// - Heads that are not commit ids, or that the server does not know, are
///   simply not contained. Heads equal to `production_head` are contained
///   without asking the server; when no other head is left, nothing is
///   fetched at all.
/// - `production_head` must be a full commit id (40 hex digits); the server
///   must have it.
///
/// Errors: [`GitError::MergeCheckUnsupported`] when the server does not
/// speak protocol v2 or its `fetch` offers no `shallow` or no `filter`
/// (Kapsa then downloads nothing, rather than whole trees and files), and
/// every error of [`list_branches`](super::list_branches) (the same
/// connection, bounds and error texts). A pack larger than the byte budget
/// is [`GitError::LimitExceeded`].
pub async fn contained_in(
    url: &str,
    credentials: Option<&GitCredentials>,
    options: &ListOptions,
    production_head: &str,
    heads: &BTreeSet<String>,
    depth: u32,
) -> Result<BTreeSet<String>, GitError> {
    let production = parse_id(production_head).ok_or_else(|| {
        GitError::Internal(format!(
            "the production head {:?} is not a full commit id",
            bounded(production_head, 80)
        ))
    })?;
    let mut contained = BTreeSet::new();
    let mut candidates: HashMap<ObjectId, Vec<&String>> = HashMap::new();
    for head in heads {
        match parse_id(head) {
            Some(id) if id == production => {
                contained.insert(head.clone());
            }
            Some(id) => candidates.entry(id).or_default().push(head),
            None => {}
        }
    }
    if candidates.is_empty() || depth <= 1 {
        return Ok(contained);
    }

    let max_bytes = options.max_bytes.min(MAX_MERGE_CHECK_BYTES);
    let graph = remote::run(url, credentials, options, max_bytes, move |session| {
        fetch_history(&session, production, depth, max_bytes)
    })
    .await?;
    let reachable = graph.reachable_from(production, depth);
    for (id, names) in candidates {
        if reachable.contains(&id) {
            contained.extend(names.into_iter().cloned());
        }
    }
    Ok(contained)
}

/// A full lower-case or upper-case hex SHA-1 commit id.
fn parse_id(hex: &str) -> Option<ObjectId> {
    let hex = hex.trim();
    (hex.len() == gix::hash::Kind::Sha1.len_in_hex())
        .then(|| ObjectId::from_hex(hex.to_ascii_lowercase().as_bytes()).ok())
        .flatten()
}

/// Ask for the last `depth` commits of `want`, commits only, and read them.
fn fetch_history(
    session: &Session,
    want: ObjectId,
    depth: u32,
    max_bytes: u64,
) -> Result<Graph, GitError> {
    let display = session.remote.display.clone();
    let (_dir, repo) = remote::scratch_repository()?;
    let connected = remote::connect(session, &repo)?;
    let mut authenticate = connected.authenticate();
    let remote::Connected {
        mut transport,
        transport_options,
        ssh,
        ..
    } = connected;
    let fetched = (|| -> Result<Graph, Failure> {
        if let Some(config) = transport_options.as_deref() {
            transport.configure(config).map_err(|e| {
                GitError::Internal(format!("cannot configure the git transport: {e}"))
            })?;
        }
        let handshake = gix::protocol::handshake(
            &mut transport,
            Service::UploadPack,
            &mut authenticate,
            Vec::new(),
            &mut gix::progress::Discard,
        )?;
        check_capabilities(
            handshake.server_protocol_version,
            &handshake.capabilities,
            &display,
        )?;

        let agent = format!("kapsa/{}", env!("CARGO_PKG_VERSION"));
        let mut reader = transport
            .invoke(
                "fetch",
                [("agent", Some(agent.as_str()))].into_iter(),
                Some(fetch_arguments(want, depth).into_iter()),
                false,
            )
            .map_err(|e| {
                Failure::Ours(GitError::Unreachable(format!(
                    "{display}: the fetch request failed: {}",
                    bounded(&e.to_string(), 200)
                )))
            })?;
        // A refusal (an unknown `want`, say) is the git protocol's error
        // line where the first section's header would be.
        if let Some(Ok(Ok(line))) = reader.peek_data_line()
            && let Some(refusal) = line.strip_prefix(b"ERR ")
        {
            return Err(GitError::Unreachable(format!(
                "{display}: the server refused the fetch request: {}",
                bounded(&String::from_utf8_lossy(refusal), 200).trim()
            ))
            .into());
        }
        let response =
            Response::from_line_reader(Protocol::V2, &mut reader, true, false).map_err(|e| {
                if e.is_corrupted() && remote::server_error_line(&e).is_none() {
                    Failure::Ours(GitError::Unreachable(format!(
                        "{display}: the server's answer to the fetch request is not valid git protocol"
                    )))
                } else {
                    Failure::Git(e)
                }
            })?;
        if !response.has_pack() {
            return Err(GitError::Unreachable(format!(
                "{display}: the server answered the fetch request without a pack"
            ))
            .into());
        }
        // Side-band: 1 is the pack, 2 progress (asked away with
        // `no-progress`), 3 an error of the server, which ends the read.
        let aborted = Arc::new(AtomicBool::new(false));
        reader.set_progress_handler(Some(Box::new({
            let aborted = aborted.clone();
            move |is_error: bool, _text: &[u8]| {
                if is_error {
                    aborted.store(true, Ordering::SeqCst);
                    std::ops::ControlFlow::Break(())
                } else {
                    std::ops::ControlFlow::Continue(())
                }
            }
        })));
        let commits = read_commits(&mut reader).map_err(|e| {
            if aborted.load(Ordering::SeqCst) {
                GitError::Unreachable(format!(
                    "{display}: the server reported an error while sending the pack"
                ))
            } else {
                e.into_git_error(&display)
            }
        })?;
        if !commits.contains_key(&want) {
            return Err(GitError::Unreachable(format!(
                "{display}: the server's pack lacks the production head {want}"
            ))
            .into());
        }
        Ok(Graph { parents: commits })
    })();
    drop(transport);
    remote::finish(session, ssh.as_ref(), fetched).map_err(|e| match e {
        // The budget's own words are about refs.
        GitError::LimitExceeded(_)
            if matches!(session.budget.tripped(), Some(GitError::LimitExceeded(_))) =>
        {
            GitError::LimitExceeded(format!(
                "{display}: the server sent more than {max_bytes} bytes for the merge check (the last {depth} commits, without files); Kapsa reads at most that much"
            ))
        }
        e => e,
    })
}

/// Protocol v2, a `fetch` with `shallow` and `filter`, SHA-1 objects.
fn check_capabilities(
    version: Protocol,
    capabilities: &gix::protocol::transport::client::Capabilities,
    display: &str,
) -> Result<(), GitError> {
    let unsupported = |what: &str| {
        Err(GitError::MergeCheckUnsupported(format!(
            "{display}: {what}; the merge check needs a depth-limited fetch of commits only"
        )))
    };
    if version != Protocol::V2 {
        return unsupported("the server does not speak git protocol v2");
    }
    let features: Vec<Vec<u8>> = capabilities
        .capability("fetch")
        .and_then(|c| c.values().map(|v| v.map(|f| f.to_vec()).collect()))
        .unwrap_or_default();
    let has = |name: &str| features.iter().any(|f| f.as_slice() == name.as_bytes());
    if capabilities.capability("fetch").is_none() {
        return unsupported("the server offers no fetch command");
    }
    if !has("shallow") {
        return unsupported("the server's fetch does not support shallow (deepen)");
    }
    if !has("filter") {
        return unsupported(
            "the server's fetch does not support filter (git servers need uploadpack.allowFilter)",
        );
    }
    if let Some(format) = capabilities
        .capability("object-format")
        .and_then(|c| c.value())
        && format.as_bytes() != b"sha1"
    {
        return unsupported("the repository does not use SHA-1 object ids");
    }
    Ok(())
}

/// The arguments of the one `fetch` request: no thin pack (every delta's
/// base is in the pack), no progress messages, and `done` at once (there is
/// nothing to negotiate: the client has nothing).
fn fetch_arguments(want: ObjectId, depth: u32) -> Vec<gix::bstr::BString> {
    [
        "no-progress".to_owned(),
        "ofs-delta".to_owned(),
        format!("want {want}"),
        format!("deepen {depth}"),
        format!("filter {COMMITS_ONLY}"),
        "done".to_owned(),
    ]
    .into_iter()
    .map(Into::into)
    .collect()
}

/// Commits and their parents, as far as the pack goes.
#[derive(Debug, Default)]
struct Graph {
    parents: HashMap<ObjectId, Vec<ObjectId>>,
}

impl Graph {
    /// Every commit reachable from `start` through any parent, fewer than
    /// `depth` links away (`start` itself included when it is known).
    fn reachable_from(&self, start: ObjectId, depth: u32) -> HashSet<ObjectId> {
        let mut seen = HashSet::new();
        if !self.parents.contains_key(&start) {
            return seen;
        }
        let mut queue = VecDeque::from([(start, 0u32)]);
        seen.insert(start);
        while let Some((id, distance)) = queue.pop_front() {
            if distance + 1 >= depth {
                continue;
            }
            for parent in self.parents.get(&id).into_iter().flatten() {
                if self.parents.contains_key(parent) && seen.insert(*parent) {
                    queue.push_back((*parent, distance + 1));
                }
            }
        }
        seen
    }
}

/// Why a pack could not be read.
#[derive(Debug, PartialEq, Eq)]
enum PackError {
    /// Not a valid pack (or a broken stream).
    Invalid(String),
    /// An object larger than Kapsa inflates.
    TooLarge(String),
}

impl PackError {
    fn into_git_error(self, display: &str) -> GitError {
        match self {
            PackError::Invalid(what) => GitError::Unreachable(format!(
                "{display}: the server sent an invalid pack: {what}"
            )),
            PackError::TooLarge(what) => GitError::LimitExceeded(format!("{display}: {what}")),
        }
    }
}

/// Where a delta's base is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Base {
    Offset(u64),
    Id(ObjectId),
}

/// A delta waiting for its base: where it is, its compressed instructions
/// and their inflated size.
struct Delta {
    offset: u64,
    compressed: Vec<u8>,
    size: u64,
}

/// A commit read so far: where it is in the pack, its id and its bytes.
struct Resolved {
    offset: u64,
    id: ObjectId,
    data: Vec<u8>,
}

/// Read a pack (a SHA-1 one, its trailer verified) and return the commit
/// objects in it with their parents. Deltas are resolved against their base
/// in the same pack; trees, blobs and tags (and deltas of them) are passed
/// over without inflating them.
fn read_commits(pack: impl BufRead) -> Result<HashMap<ObjectId, Vec<ObjectId>>, PackError> {
    let kind = gix::hash::Kind::Sha1;
    let invalid = |e: &dyn std::fmt::Display| PackError::Invalid(bounded(&e.to_string(), 200));
    let entries =
        BytesToEntriesIter::new_from_header(pack, Mode::Verify, EntryDataMode::Keep, kind)
            .map_err(|e| invalid(&e))?;
    let mut inflated = Inflated::default();
    let mut ready: Vec<Resolved> = Vec::new();
    let mut waiting: HashMap<Base, Vec<Delta>> = HashMap::new();
    for entry in entries {
        let entry = entry.map_err(|e| invalid(&e))?;
        let compressed = entry.compressed.unwrap_or_default();
        match entry.header {
            Header::Commit => {
                let data = inflated.inflate(&compressed, entry.decompressed_size)?;
                let id = commit_id(&data)?;
                ready.push(Resolved {
                    offset: entry.pack_offset,
                    id,
                    data,
                });
            }
            Header::Tree | Header::Blob | Header::Tag => {}
            Header::OfsDelta { base_distance } => {
                let base = Header::verified_base_pack_offset(entry.pack_offset, base_distance)
                    .ok_or_else(|| {
                        PackError::Invalid("a delta's base is outside the pack".into())
                    })?;
                waiting.entry(Base::Offset(base)).or_default().push(Delta {
                    offset: entry.pack_offset,
                    compressed,
                    size: entry.decompressed_size,
                });
            }
            Header::RefDelta { base_id } => {
                waiting.entry(Base::Id(base_id)).or_default().push(Delta {
                    offset: entry.pack_offset,
                    compressed,
                    size: entry.decompressed_size,
                });
            }
        }
    }

    // Each commit resolves the deltas based on it, which may be bases in
    // turn; a base's bytes are dropped once its deltas are applied.
    let mut commits = HashMap::new();
    while let Some(commit) = ready.pop() {
        commits.insert(commit.id, parents(&commit.data)?);
        let dependents = [Base::Offset(commit.offset), Base::Id(commit.id)]
            .into_iter()
            .filter_map(|base| waiting.remove(&base))
            .flatten();
        for delta in dependents {
            let instructions = inflated.inflate(&delta.compressed, delta.size)?;
            let data = apply_delta(&commit.data, &instructions, MAX_COMMIT_BYTES)?;
            inflated.account(data.len() as u64)?;
            let id = commit_id(&data)?;
            ready.push(Resolved {
                offset: delta.offset,
                id,
                data,
            });
        }
    }
    Ok(commits)
}

/// Inflates pack entries, within [`MAX_COMMIT_BYTES`] per object and
/// [`MAX_INFLATED_BYTES`] in all.
#[derive(Default)]
struct Inflated {
    total: u64,
    zlib: gix::zlib::Inflate,
}

impl Inflated {
    fn account(&mut self, bytes: u64) -> Result<(), PackError> {
        self.total = self.total.saturating_add(bytes);
        if self.total > MAX_INFLATED_BYTES {
            return Err(PackError::TooLarge(format!(
                "the pack inflates to more than {MAX_INFLATED_BYTES} bytes; Kapsa inflates at most that much for a merge check"
            )));
        }
        Ok(())
    }

    fn inflate(&mut self, compressed: &[u8], size: u64) -> Result<Vec<u8>, PackError> {
        if size > MAX_COMMIT_BYTES {
            return Err(PackError::TooLarge(format!(
                "the pack holds an object of {size} bytes; Kapsa reads commits of at most {MAX_COMMIT_BYTES} bytes"
            )));
        }
        self.account(size)?;
        let mut out = vec![0; size as usize];
        self.zlib.reset();
        let (status, _read, written) = self
            .zlib
            .once(compressed, &mut out)
            .map_err(|e| PackError::Invalid(bounded(&e.to_string(), 200)))?;
        if status != gix::zlib::Status::StreamEnd || written != out.len() {
            return Err(PackError::Invalid(
                "an object's compressed data does not match its size".into(),
            ));
        }
        Ok(out)
    }
}

fn commit_id(data: &[u8]) -> Result<ObjectId, PackError> {
    gix::objs::compute_hash(gix::hash::Kind::Sha1, gix::objs::Kind::Commit, data)
        .map_err(|e| PackError::Invalid(bounded(&e.to_string(), 200)))
}

/// The parents of a commit object: its `parent` lines, after its `tree`.
fn parents(data: &[u8]) -> Result<Vec<ObjectId>, PackError> {
    use gix::objs::commit::ref_iter::Token;
    let mut parents = Vec::new();
    for token in gix::objs::CommitRefIter::from_bytes(data, gix::hash::Kind::Sha1) {
        match token {
            Ok(Token::Tree { .. }) => {}
            Ok(Token::Parent { id }) => parents.push(id),
            Ok(_) => return Ok(parents),
            Err(_) => {
                return Err(PackError::Invalid(
                    "a commit object cannot be parsed".into(),
                ));
            }
        }
    }
    Err(PackError::Invalid("a commit object has no author".into()))
}

/// A git delta's size header: 7 bits a byte, least significant first.
fn delta_size(data: &[u8], at: &mut usize) -> Result<u64, PackError> {
    let mut size = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *data
            .get(*at)
            .ok_or_else(|| PackError::Invalid("a delta's header is cut short".into()))?;
        *at += 1;
        size |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(size);
        }
    }
    Err(PackError::Invalid("a delta's header is too long".into()))
}

/// Apply git delta `instructions` to `base`: after the base's and the
/// result's sizes, copy instructions (high bit set: offset and size bytes
/// selected by the low seven bits, a size of 0 meaning 64 KiB) and insert
/// instructions (1 to 127 literal bytes). The result is at most `max` bytes.
fn apply_delta(base: &[u8], instructions: &[u8], max: u64) -> Result<Vec<u8>, PackError> {
    let corrupt = |what: &str| PackError::Invalid(format!("a delta {what}"));
    let mut at = 0;
    let base_size = delta_size(instructions, &mut at)?;
    let result_size = delta_size(instructions, &mut at)?;
    if base_size != base.len() as u64 {
        return Err(corrupt("names a base of another size"));
    }
    if result_size > max {
        return Err(PackError::TooLarge(format!(
            "the pack holds an object of {result_size} bytes; Kapsa reads commits of at most {max} bytes"
        )));
    }
    let mut out = Vec::with_capacity(result_size as usize);
    while let Some(&command) = instructions.get(at) {
        at += 1;
        if command & 0x80 != 0 {
            let mut field = |bits: u8, first_bit: u8| -> Result<usize, PackError> {
                let mut value = 0usize;
                for i in 0..bits {
                    if command & (1 << (first_bit + i)) != 0 {
                        let byte = *instructions
                            .get(at)
                            .ok_or_else(|| corrupt("copy instruction is cut short"))?;
                        at += 1;
                        value |= usize::from(byte) << (8 * i);
                    }
                }
                Ok(value)
            };
            let offset = field(4, 0)?;
            let size = match field(3, 4)? {
                0 => 0x10000,
                size => size,
            };
            let copied = offset
                .checked_add(size)
                .and_then(|end| base.get(offset..end))
                .ok_or_else(|| corrupt("copies from beyond its base"))?;
            out.extend_from_slice(copied);
        } else if command != 0 {
            let end = at + usize::from(command);
            let inserted = instructions
                .get(at..end)
                .ok_or_else(|| corrupt("insert instruction is cut short"))?;
            at = end;
            out.extend_from_slice(inserted);
        } else {
            return Err(corrupt("uses the reserved instruction 0"));
        }
        if out.len() as u64 > result_size {
            return Err(corrupt("makes more bytes than it announces"));
        }
    }
    if out.len() as u64 != result_size {
        return Err(corrupt("makes fewer bytes than it announces"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn commit_object(tree: &str, parents: &[ObjectId], message: &str) -> Vec<u8> {
        let mut text = format!("tree {tree}\n");
        for p in parents {
            text.push_str(&format!("parent {p}\n"));
        }
        text.push_str("author A <a@x> 1700000000 +0000\ncommitter A <a@x> 1700000000 +0000\n\n");
        text.push_str(message);
        text.into_bytes()
    }

    const TREE: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w =
            gix::zlib::stream::deflate::Write::new(&mut out, gix::zlib::Compression::default());
        w.write_all(data).unwrap();
        w.flush().unwrap();
        drop(w);
        out
    }

    /// A pack entry's type-and-size header.
    fn entry_header(kind: u8, size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut size = size;
        let mut byte = (kind << 4) | (size & 0x0f) as u8;
        size >>= 4;
        while size != 0 {
            out.push(byte | 0x80);
            byte = (size & 0x7f) as u8;
            size >>= 7;
        }
        out.push(byte);
        out
    }

    /// The negative offset encoding of OFS_DELTA.
    fn ofs(mut distance: u64) -> Vec<u8> {
        let mut bytes = vec![(distance & 0x7f) as u8];
        distance >>= 7;
        while distance != 0 {
            distance -= 1;
            bytes.push(0x80 | (distance & 0x7f) as u8);
            distance >>= 7;
        }
        bytes.reverse();
        bytes
    }

    enum Item<'a> {
        Object(u8, &'a [u8]),
        /// A delta on the entry at this index, by offset.
        OfsDelta(usize, &'a [u8]),
        RefDelta(ObjectId, &'a [u8]),
    }

    fn pack(items: &[Item<'_>]) -> Vec<u8> {
        let mut out = b"PACK".to_vec();
        out.extend_from_slice(&2u32.to_be_bytes());
        out.extend_from_slice(&(items.len() as u32).to_be_bytes());
        let mut offsets = Vec::new();
        for item in items {
            let offset = out.len() as u64;
            offsets.push(offset);
            match item {
                Item::Object(kind, data) => {
                    out.extend(entry_header(*kind, data.len()));
                    out.extend(deflate(data));
                }
                Item::OfsDelta(base, delta) => {
                    out.extend(entry_header(6, delta.len()));
                    out.extend(ofs(offset - offsets[*base]));
                    out.extend(deflate(delta));
                }
                Item::RefDelta(base, delta) => {
                    out.extend(entry_header(7, delta.len()));
                    out.extend_from_slice(base.as_bytes());
                    out.extend(deflate(delta));
                }
            }
        }
        let mut hasher = gix::hash::hasher(gix::hash::Kind::Sha1);
        hasher.update(&out);
        out.extend_from_slice(hasher.try_finalize().unwrap().as_bytes());
        out
    }

    fn id(data: &[u8]) -> ObjectId {
        commit_id(data).unwrap()
    }

    /// A delta that keeps `base` but its last `cut` bytes and appends `tail`.
    fn delta(base: &[u8], cut: usize, tail: &[u8]) -> Vec<u8> {
        let keep = base.len() - cut;
        let result = keep + tail.len();
        let mut d = Vec::new();
        for mut n in [base.len(), result] {
            loop {
                let byte = (n & 0x7f) as u8;
                n >>= 7;
                if n == 0 {
                    d.push(byte);
                    break;
                }
                d.push(byte | 0x80);
            }
        }
        if keep > 0 {
            // copy offset 0, size `keep` (two size bytes)
            d.extend([0x80 | 0x10 | 0x20, (keep & 0xff) as u8, (keep >> 8) as u8]);
        }
        for chunk in tail.chunks(127) {
            d.push(chunk.len() as u8);
            d.extend_from_slice(chunk);
        }
        d
    }

    #[test]
    fn commits_and_parents_come_out_of_a_pack() {
        let root = commit_object(TREE, &[], "root\n");
        let a = commit_object(TREE, &[id(&root)], "a\n");
        let b = commit_object(TREE, &[id(&root)], "b\n");
        let merge = commit_object(TREE, &[id(&a), id(&b)], "merge\n");
        let bytes = pack(&[
            Item::Object(1, &merge),
            Item::Object(1, &a),
            Item::Object(2, b"tree bytes are skipped"),
            Item::Object(1, &b),
            Item::Object(3, b"blob"),
            Item::Object(1, &root),
        ]);
        let commits = read_commits(&bytes[..]).unwrap();
        assert_eq!(commits.len(), 4);
        assert_eq!(commits[&id(&merge)], vec![id(&a), id(&b)]);
        assert_eq!(commits[&id(&root)], Vec::<ObjectId>::new());

        let graph = Graph { parents: commits };
        let all = graph.reachable_from(id(&merge), 200);
        assert_eq!(all.len(), 4);
        // Second parents count: b is only reachable through the merge's
        // second parent.
        assert!(all.contains(&id(&b)));
        // Fewer than `depth` links: depth 2 is the merge and its parents.
        let near = graph.reachable_from(id(&merge), 2);
        assert_eq!(near, HashSet::from([id(&merge), id(&a), id(&b)]));
        assert_eq!(graph.reachable_from(id(&merge), 1).len(), 1);
        assert_eq!(graph.reachable_from(id(&a), 200).len(), 2);
        assert!(
            graph
                .reachable_from(ObjectId::null(gix::hash::Kind::Sha1), 9)
                .is_empty()
        );
    }

    #[test]
    fn deltas_are_resolved_by_offset_and_by_id_in_chains() {
        let root = commit_object(TREE, &[], "root commit with a long enough message\n");
        let child = commit_object(
            TREE,
            &[id(&root)],
            "root commit with a long enough message\n",
        );
        let grandchild = commit_object(
            TREE,
            &[id(&child)],
            "root commit with a long enough message\n",
        );
        // child = root minus its message plus "parent" etc.: build deltas that
        // produce exactly the target from the base.
        let d1 = delta(&root, root.len(), &child);
        let d2 = delta(&child, child.len(), &grandchild);
        assert_eq!(apply_delta(&root, &d1, MAX_COMMIT_BYTES).unwrap(), child);
        // A delta chain: grandchild (by id) on child (by offset) on root.
        let bytes = pack(&[
            Item::RefDelta(id(&child), &d2),
            Item::Object(1, &root),
            Item::OfsDelta(1, &d1),
        ]);
        let commits = read_commits(&bytes[..]).unwrap();
        assert_eq!(commits.len(), 3);
        assert_eq!(commits[&id(&grandchild)], vec![id(&child)]);
        assert_eq!(commits[&id(&child)], vec![id(&root)]);

        // Keeping a prefix of the base.
        let same_tree = commit_object(TREE, &[], "root commit with a long enough message\nmore\n");
        let d = delta(&root, 0, b"more\n");
        assert_eq!(apply_delta(&root, &d, MAX_COMMIT_BYTES).unwrap(), same_tree);
    }

    #[test]
    fn broken_packs_and_deltas_are_refused() {
        let root = commit_object(TREE, &[], "root\n");
        let mut bytes = pack(&[Item::Object(1, &root)]);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(
            read_commits(&bytes[..]),
            Err(PackError::Invalid(_))
        ));
        assert!(matches!(
            read_commits(&b"PACK"[..]),
            Err(PackError::Invalid(_))
        ));
        assert!(matches!(
            read_commits(&b"<html>"[..]),
            Err(PackError::Invalid(_))
        ));
        let not_a_commit = pack(&[Item::Object(1, b"hello")]);
        assert!(matches!(
            read_commits(&not_a_commit[..]),
            Err(PackError::Invalid(_))
        ));

        let d = delta(&root, 0, b"x");
        // Wrong base size, copy beyond the base, reserved instruction, an
        // insert cut short, a result larger than announced or allowed.
        assert!(apply_delta(b"short", &d, MAX_COMMIT_BYTES).is_err());
        assert!(apply_delta(b"12345", &[5, 5, 0x91, 4, 5], 100).is_err());
        assert!(apply_delta(b"12345", &[5, 1, 0], 100).is_err());
        assert!(apply_delta(b"12345", &[5, 3, 3, b'a'], 100).is_err());
        assert!(apply_delta(b"12345", &[5, 1, 2, b'a', b'b'], 100).is_err());
        assert!(matches!(
            apply_delta(b"12345", &[5, 0x80, 0x80, 0x80, 0x01, 1, b'a'], 100),
            Err(PackError::TooLarge(_))
        ));
        assert_eq!(
            apply_delta(b"12345", &[5, 3, 0x91, 1, 3], 100).unwrap(),
            b"234"
        );
        // A size of 0 copies 64 KiB.
        let big = vec![7u8; 0x10000];
        assert_eq!(
            apply_delta(&big, &[0x80, 0x80, 0x04, 0x80, 0x80, 0x04, 0x80], u64::MAX).unwrap(),
            big
        );

        // An object larger than a commit may be is not inflated.
        let huge = vec![b'a'; (MAX_COMMIT_BYTES + 1) as usize];
        let bytes = pack(&[Item::Object(1, &huge)]);
        assert!(matches!(
            read_commits(&bytes[..]),
            Err(PackError::TooLarge(_))
        ));
    }

    #[test]
    fn commit_parsing_reads_every_parent() {
        let p1 = ObjectId::from_hex(b"1111111111111111111111111111111111111111").unwrap();
        let p2 = ObjectId::from_hex(b"2222222222222222222222222222222222222222").unwrap();
        let p3 = ObjectId::from_hex(b"3333333333333333333333333333333333333333").unwrap();
        let octopus = commit_object(TREE, &[p1, p2, p3], "octopus\n");
        assert_eq!(parents(&octopus).unwrap(), vec![p1, p2, p3]);
        assert!(parents(b"tree nonsense\n").is_err());
        assert!(parents(b"").is_err());
    }

    #[test]
    fn ids_and_arguments() {
        let hex = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(parse_id(hex).unwrap().to_string(), hex);
        assert_eq!(parse_id(&hex.to_uppercase()).unwrap().to_string(), hex);
        assert!(parse_id("0123456").is_none());
        assert!(parse_id("main").is_none());
        assert!(parse_id(&"z".repeat(40)).is_none());
        let args: Vec<String> = fetch_arguments(parse_id(hex).unwrap(), 200)
            .into_iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(
            args,
            [
                "no-progress",
                "ofs-delta",
                &format!("want {hex}"),
                "deepen 200",
                "filter tree:0",
                "done"
            ]
        );
    }

    #[test]
    fn capabilities_are_checked() {
        use gix::protocol::transport::client::Capabilities;
        let caps = |fetch: &str| {
            Capabilities::from_lines(
                format!("version 2\nagent=git/2.39\nls-refs=unborn\n{fetch}\nobject-format=sha1\n")
                    .into(),
            )
            .unwrap()
        };
        let full = caps("fetch=shallow wait-for-done filter");
        assert!(check_capabilities(Protocol::V2, &full, "r").is_ok());
        for (version, c) in [
            (Protocol::V1, full.clone()),
            (Protocol::V2, caps("fetch=shallow wait-for-done")),
            (Protocol::V2, caps("fetch=filter")),
            (Protocol::V2, caps("server-option")),
        ] {
            let err = check_capabilities(version, &c, "r").unwrap_err();
            assert_eq!(err.reason(), "MergeCheckUnsupported", "{err}");
        }
        let sha256 = Capabilities::from_lines(
            "version 2\nfetch=shallow filter\nobject-format=sha256\n".into(),
        )
        .unwrap();
        assert!(check_capabilities(Protocol::V2, &sha256, "r").is_err());
    }

    #[tokio::test]
    async fn no_request_without_a_head_to_look_for() {
        let production = "0123456789abcdef0123456789abcdef01234567";
        let options = ListOptions::new(std::time::Duration::from_secs(5));
        // An unreachable URL: any connection attempt would fail.
        let url = "https://git.invalid/a.git";
        let heads = BTreeSet::from([production.to_owned(), "not-an-id".to_owned()]);
        let found = contained_in(url, None, &options, production, &heads, 200)
            .await
            .unwrap();
        assert_eq!(found, BTreeSet::from([production.to_owned()]));
        let other = BTreeSet::from(["1111111111111111111111111111111111111111".to_owned()]);
        assert!(
            contained_in(url, None, &options, production, &other, 1)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            contained_in(url, None, &options, production, &other, 200)
                .await
                .is_err()
        );
        assert!(
            contained_in(url, None, &options, "main", &other, 200)
                .await
                .is_err()
        );
    }
}
