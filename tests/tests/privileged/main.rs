//! The privileged tests: real eBPF programs in the kernel, network namespaces as pods, real packets
//! through veth pairs, the real agent binary — one test binary, one harness (`common`), one gate.
//!
//! - A test here that needs root says so by failing (`common::require_root`), not by skipping (a few,
//!   such as `conformance::conformance_cases_parse`, need nothing and run here with the rest). The
//!   binary is `test = false` in Cargo.toml, so a plain `cargo test --workspace` never builds or runs it;
//!   `cargo xtask test` builds the agent and the lab and runs it as root. By hand: `cargo xtask build`,
//!   then `cargo test -p ztrust-tests --test privileged` (the tests run `target/debug/ztrust-agent` and
//!   `ztrust-lab`, or `ZTRUST_AGENT_BIN` / `ZTRUST_LAB_BIN`; cargo does not rebuild them for this binary).
//! - The cluster tier (`cluster`) needs a running node as well: its tests are `#[ignore]`d here and run
//!   by `cargo xtask test` with `--ignored cluster::` once `cargo xtask cluster up --agent` is up.
//! - Names never collide: each test makes namespaces, interfaces and state directories of its own tag
//!   and the process id, and removes them on `Drop`, also when it fails. Tests run one at a time
//!   (`--test-threads=1`): they share the host's bpffs, nftables and the agent's port numbers.

mod common;
// The agent's unprivileged Kubernetes-source tests and the end-to-end test here share one fake API
// server (the agent's test crate cannot depend on this one, which depends on the agent).
#[path = "../../../ztrust-agent/tests/integration/fake_apiserver/mod.rs"]
mod fake_apiserver;

mod adversarial;
mod adversarial_ipv6;
mod adversarial_node;
mod audit;
mod cluster;
mod conformance;
mod datapath;
mod explain;
mod kube_e2e;
mod lab_netns;
mod least_privilege;
mod multinode;
mod node_lab;
mod observer_e2e;
mod otlp;
mod packets;
mod pinned_links;
mod pinning;
mod restart;
mod services;
mod services_lab;
mod tables;
