//! Directories as browsable trees: an input root (Directory messages in the
//! CAS, `/tree/{function}/{hash}/{size}`) or an output directory (one Tree
//! message, `/output-tree/...`).
//!
//! The tree is nested `<details>` elements, so it expands by clicking
//! without JavaScript. Directories are loaded breadth-first up to a budget;
//! deeper ones become links to their own page, so a toolchain of thousands
//! of files costs a bounded amount of work per page.
//!
//! Stable hooks: `ul.tree` lists; `li.dir` holding `details > summary`
//! (the name and a `/`), or `a.browse` when beyond the budget; `li.file`
//! with `a.download` (the name), `span.size` and `span.exec`;
//! `li.symlink` with `span.target`.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Path, State};
use futures::StreamExt;
use prost::Message;
use remote_apis::reapi::{Directory, Tree};
use remote_apis::{Digest, DigestFunction};

use super::{PageError, PageResult, blob_href, digest_path, escape, fmt_bytes, html, parse_digest, read_proto};
use crate::http::HttpState;

/// Directories loaded for one page of its own.
const PAGE_DIRS: usize = 512;
/// Directories loaded for the input root shown inside the action page.
pub const EMBEDDED_DIRS: usize = 64;
/// Entries rendered at most, all directories together.
const MAX_ENTRIES: usize = 5000;
/// Directory reads in flight at once.
const PARALLEL_READS: usize = 16;

pub async fn directory_page(
    State(state): State<Arc<HttpState>>,
    Path((function, hash, size)): Path<(String, String, String)>,
) -> PageResult {
    let root = parse_digest(&function, &hash, &size)?;
    let dir: Directory = read_proto(&state, &root, "Directory").await?;
    let mut body = format!("<p>Directory <span class=\"mono\">{}</span></p>", escape(&root.to_string()));
    render(&Source::Cas(&state), root, dir, PAGE_DIRS, &mut body).await;
    Ok(html("Directory", &body))
}

pub async fn output_page(
    State(state): State<Arc<HttpState>>,
    Path((function, hash, size)): Path<(String, String, String)>,
) -> PageResult {
    let digest = parse_digest(&function, &hash, &size)?;
    let tree: Tree = read_proto(&state, &digest, "Tree").await?;
    let root = tree.root.ok_or_else(|| PageError::bad_request(format!("Tree {digest} has no root")))?;
    let f = digest.function;
    let children = tree.children.into_iter().map(|c| (f.digest_of(&c.encode_to_vec()), c)).collect();
    let root_digest = f.digest_of(&root.encode_to_vec());
    let mut body =
        format!("<p>Output directory (Tree <span class=\"mono\">{}</span>)</p>", escape(&digest.to_string()));
    render(&Source::Tree(children), root_digest, root, usize::MAX, &mut body).await;
    Ok(html("Output directory", &body))
}

/// Renders `root` (already read) as a tree, loading up to `max_dirs`
/// directories below it.
pub async fn render(source: &Source<'_>, digest: Digest, root: Directory, max_dirs: usize, out: &mut String) {
    let dirs = load(source, digest, root, max_dirs).await;
    let mut r = Renderer { dirs: &dirs, function: digest.function, left: MAX_ENTRIES, links: source.is_cas() };
    r.directory(&digest, out);
    if r.left == 0 {
        let _ = write!(out, "<p class=\"muted\">Only the first {MAX_ENTRIES} entries are shown.</p>");
    }
}

/// Where the directories of a tree come from.
pub enum Source<'a> {
    /// Directory messages in the CAS, by digest.
    Cas(&'a HttpState),
    /// The children of one Tree message, by their digest.
    Tree(HashMap<Digest, Directory>),
}

impl Source<'_> {
    fn is_cas(&self) -> bool {
        matches!(self, Source::Cas(_))
    }

    async fn load(&self, d: &Digest) -> Result<Directory, String> {
        match self {
            Source::Cas(state) => read_proto(state, d, "Directory").await.map_err(|e| e.message),
            Source::Tree(children) => {
                children.get(d).cloned().ok_or_else(|| format!("directory {d} is missing from the Tree"))
            }
        }
    }
}

type Loaded = HashMap<Digest, Result<Directory, String>>;

/// Breadth-first: every directory of a level is read (in parallel) before
/// the next level, until `max_dirs` are loaded.
async fn load(source: &Source<'_>, digest: Digest, root: Directory, max_dirs: usize) -> Loaded {
    let mut loaded = Loaded::new();
    let mut level = children(digest.function, &root);
    loaded.insert(digest, Ok(root));
    while !level.is_empty() && loaded.len() < max_dirs {
        let mut seen = HashSet::new();
        let todo: Vec<Digest> = level
            .drain(..)
            .filter(|d| !loaded.contains_key(d) && seen.insert(*d))
            .take(max_dirs - loaded.len())
            .collect();
        let read: Vec<(Digest, Result<Directory, String>)> = futures::stream::iter(todo)
            .map(|d| async move { (d, source.load(&d).await) })
            .buffer_unordered(PARALLEL_READS)
            .collect()
            .await;
        for (d, dir) in read {
            if let Ok(dir) = &dir {
                level.extend(children(digest.function, dir));
            }
            loaded.insert(d, dir);
        }
    }
    loaded
}

fn children(function: DigestFunction, dir: &Directory) -> Vec<Digest> {
    dir.directories
        .iter()
        .filter_map(|n| n.digest.as_ref())
        .filter_map(|d| Digest::from_proto(function, d).ok())
        .collect()
}

struct Renderer<'a> {
    dirs: &'a Loaded,
    function: DigestFunction,
    /// Entries that may still be rendered.
    left: usize,
    /// Whether directories beyond the budget can be linked (their own page
    /// reads the CAS; a Tree's children are not there).
    links: bool,
}

impl Renderer<'_> {
    /// The entries of a loaded directory, as a `ul.tree`.
    fn directory(&mut self, digest: &Digest, out: &mut String) {
        let dir = match self.dirs.get(digest) {
            Some(Ok(dir)) => dir,
            Some(Err(e)) => {
                let _ = write!(out, "<p class=\"failed\">{}</p>", escape(e));
                return;
            }
            None => return,
        };
        out.push_str("<ul class=\"tree\">");
        if dir.directories.is_empty() && dir.files.is_empty() && dir.symlinks.is_empty() {
            out.push_str("<li class=\"muted\">(empty)</li>");
        }
        for node in &dir.directories {
            if !self.take() {
                break;
            }
            let child = node.digest.as_ref().and_then(|d| Digest::from_proto(self.function, d).ok());
            self.subdirectory(&node.name, child, out);
        }
        for f in &dir.files {
            if !self.take() {
                break;
            }
            let name = escape(&f.name);
            let Some(d) = f.digest.as_ref().and_then(|d| Digest::from_proto(self.function, d).ok()) else {
                let _ = write!(out, "<li class=\"file\">{name} <span class=\"failed\">malformed digest</span></li>");
                continue;
            };
            let exec = if f.is_executable { " <span class=\"exec\">executable</span>" } else { "" };
            let _ = write!(
                out,
                "<li class=\"file\"><a class=\"download mono\" href=\"{}\">{name}</a> \
                 <span class=\"size muted\">{}</span>{exec}</li>",
                escape(&blob_href(&d, Some(&f.name))),
                fmt_bytes(d.size)
            );
        }
        for s in &dir.symlinks {
            if !self.take() {
                break;
            }
            let _ = write!(
                out,
                "<li class=\"symlink\"><span class=\"mono\">{}</span> → <span class=\"target mono\">{}</span></li>",
                escape(&s.name),
                escape(&s.target)
            );
        }
        out.push_str("</ul>");
    }

    fn subdirectory(&mut self, name: &str, child: Option<Digest>, out: &mut String) {
        let name = escape(name);
        let Some(child) = child else {
            let _ = write!(out, "<li class=\"dir\">{name}/ <span class=\"failed\">malformed digest</span></li>");
            return;
        };
        if self.dirs.contains_key(&child) {
            let _ = write!(out, "<li class=\"dir\"><details><summary class=\"mono\">{name}/</summary>");
            self.directory(&child, out);
            out.push_str("</details></li>");
        } else if self.links {
            let _ = write!(
                out,
                "<li class=\"dir\"><a class=\"browse mono\" href=\"/tree/{}\">{name}/</a></li>",
                escape(&digest_path(&child))
            );
        } else {
            let _ = write!(out, "<li class=\"dir mono\">{name}/ <span class=\"muted\">(not shown)</span></li>");
        }
    }

    fn take(&mut self) -> bool {
        if self.left == 0 {
            return false;
        }
        self.left -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remote_apis::reapi::{DirectoryNode, FileNode, SymlinkNode};

    fn file(name: &str, data: &[u8], exec: bool) -> FileNode {
        let digest = Some(DigestFunction::Sha256.digest_of(data).to_proto());
        FileNode { name: name.into(), digest, is_executable: exec, ..Default::default() }
    }

    #[tokio::test]
    async fn a_tree_nests_escapes_and_links_files() {
        let f = DigestFunction::Sha256;
        let leaf = Directory { files: vec![file("<b>.rs", b"fn", true)], ..Default::default() };
        let leaf_digest = f.digest_of(&leaf.encode_to_vec());
        let root = Directory {
            directories: vec![DirectoryNode { name: "src".into(), digest: Some(leaf_digest.to_proto()) }],
            files: vec![file("a.txt", b"hello", false)],
            symlinks: vec![SymlinkNode { name: "l".into(), target: "a.txt".into(), ..Default::default() }],
            ..Default::default()
        };
        let root_digest = f.digest_of(&root.encode_to_vec());
        let source = Source::Tree(HashMap::from([(leaf_digest, leaf)]));
        let mut out = String::new();
        render(&source, root_digest, root, usize::MAX, &mut out).await;
        assert!(out.contains("<details><summary class=\"mono\">src/</summary>"), "{out}");
        assert!(out.contains("&lt;b&gt;.rs"), "{out}");
        assert!(!out.contains("<b>"), "{out}");
        assert!(out.contains(&blob_href(&f.digest_of(b"hello"), Some("a.txt"))), "{out}");
        assert!(out.contains("<span class=\"exec\">executable</span>"), "{out}");
        assert!(out.contains("<span class=\"target mono\">a.txt</span>"), "{out}");

        // With no budget for subdirectories they are not expanded.
        let source = Source::Tree(HashMap::new());
        let mut out = String::new();
        let root = Directory {
            directories: vec![DirectoryNode { name: "src".into(), digest: Some(leaf_digest.to_proto()) }],
            ..Default::default()
        };
        render(&source, f.digest_of(&root.encode_to_vec()), root, 1, &mut out).await;
        assert!(out.contains("src/ <span class=\"muted\">(not shown)</span>"), "{out}");
    }
}
