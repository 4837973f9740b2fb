//! How an action's files must be laid out so that the action cannot change
//! a blob another action or the worker's cache sees: who owns what the
//! worker creates for the action, and whether inputs may be hard links into
//! the cache at all. The runner decides (it knows which uid the command runs
//! as); input materialization and output adoption obey.

/// What the runner requires of the files it is given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilePolicy {
    /// The (uid, gid) the command runs as when it is not the worker's own:
    /// directories the worker creates for the action are given to it, and
    /// files it cannot own (hard-linked inputs, adopted outputs) stay the
    /// worker's and read-only.
    pub action_owner: Option<(u32, u32)>,
    /// The command runs as the uid that owns the cache, so a hard link
    /// would let it change cached bytes: inputs are copies (reflinks where
    /// the filesystem has them) and outputs are copied into the cache.
    pub copy_inputs: bool,
}
