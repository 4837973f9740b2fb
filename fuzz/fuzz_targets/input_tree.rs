//! Input planning: the expanded size of an input tree (what materializing
//! it would create), computed from its distinct Directory messages, on
//! Merkle DAGs built from the input: each directory names earlier ones as
//! children (so a DAG may repeat a subtree many times), some files and
//! symlinks, and may name a directory that was never uploaded. The size
//! must match a plain expansion of the tree wherever that expansion is
//! small enough to do, and a missing directory is an error, not a panic.
#![no_main]

use std::collections::HashMap;
use std::sync::Arc;

use cargo_distbuild::worker::{TreeSize, check_directory, tree_size};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use remote_apis::reapi::{Directory, DirectoryNode, FileNode, SymlinkNode};
use remote_apis::{Digest, DigestFunction};

/// One directory: children as indices of earlier directories (an index past
/// them names a directory nobody uploaded), file count, symlink count.
type Spec = (Vec<u8>, u8, u8);

/// Expansion budget of the reference count: directories visited.
const BUDGET: u64 = 100_000;

fn build(specs: &[Spec]) -> (Vec<Digest>, HashMap<Digest, Arc<Directory>>) {
    let function = DigestFunction::Sha256;
    let mut digests: Vec<Digest> = Vec::new();
    let mut dirs = HashMap::new();
    for (i, (children, files, symlinks)) in specs.iter().enumerate() {
        let directories = children
            .iter()
            .enumerate()
            .map(|(k, &c)| {
                let digest = match digests.get(c as usize) {
                    Some(d) if (c as usize) < i => *d,
                    _ => function.digest_of(format!("missing {c}").as_bytes()),
                };
                DirectoryNode { name: format!("d{k}"), digest: Some(digest.to_proto()) }
            })
            .collect();
        let dir = Directory {
            files: (0..*files)
                .map(|k| FileNode {
                    name: format!("f{k}"),
                    digest: Some(function.empty().to_proto()),
                    ..Default::default()
                })
                .collect(),
            symlinks: (0..*symlinks)
                .map(|k| SymlinkNode { name: format!("l{k}"), target: "../x".into(), ..Default::default() })
                .collect(),
            directories,
            ..Default::default()
        };
        assert!(check_directory(&dir).is_ok(), "a well-formed directory is refused");
        let digest = function.digest_of(&dir.encode_to_vec());
        digests.push(digest);
        dirs.insert(digest, Arc::new(dir));
    }
    (digests, dirs)
}

/// The size by walking every path of the tree, or None past the budget or
/// at a missing directory.
fn expand(root: Digest, dirs: &HashMap<Digest, Arc<Directory>>) -> Option<TreeSize> {
    let mut size = TreeSize::default();
    let mut stack = vec![(root, 0usize)];
    while let Some((digest, depth)) = stack.pop() {
        let dir = dirs.get(&digest)?;
        size.directories += 1;
        if size.directories > BUDGET {
            return None;
        }
        size.depth = size.depth.max(depth);
        size.files += (dir.files.len() + dir.symlinks.len()) as u64;
        for d in &dir.directories {
            stack.push((Digest::from_proto(digest.function, d.digest.as_ref()?).ok()?, depth + 1));
        }
    }
    Some(size)
}

fuzz_target!(|specs: Vec<Spec>| {
    let (digests, dirs) = build(&specs);
    let Some(&root) = digests.last() else { return };
    let computed = tree_size(root, &dirs);
    if let Some(expected) = expand(root, &dirs) {
        assert_eq!(computed.ok(), Some(expected), "tree_size disagrees with the expansion");
    }
});
