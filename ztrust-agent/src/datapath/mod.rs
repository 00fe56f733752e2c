//! Loading, attaching and syncing the eBPF datapath.
