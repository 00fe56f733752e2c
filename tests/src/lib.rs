//! Privileged integration tests live in `tests/`; run them with `cargo xtask test`.
//!
//! [`bench`] holds the sections of `ztrust-bench` (`cargo xtask bench`).

pub mod bench;
