//! Sources of cluster state.
pub mod dir;
pub mod kube;
pub mod services;
