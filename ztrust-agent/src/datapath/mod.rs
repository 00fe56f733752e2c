//! Loading, attaching and syncing the eBPF datapath.
pub mod bind;
pub mod keys;
pub mod loader;
pub mod node_local;
pub mod pins;
pub mod sync;

/// The kernel programs, built by `build.rs` from `ztrust-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztrust"));
