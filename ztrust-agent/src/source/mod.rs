//! Sources of cluster state.
pub mod dir;
