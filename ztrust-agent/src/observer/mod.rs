//! The flow observer: a ring of recent flows with fan-out to subscribers ([`hub`]), the gRPC API
//! `ztrust.observer.v1` over a unix socket and optionally mTLS TCP ([`server`]), its filters
//! ([`filters`], one per file), and the client the `flows` / `alerts` commands use ([`client`]).

pub mod client;
pub mod convert;
pub mod explain;
pub mod filters;
pub mod hub;
pub mod server;
pub mod tasks;

/// Code generated from `proto/observer.proto` (package `ztrust.observer.v1`).
pub mod proto {
    #![allow(clippy::all, reason = "generated code: its lints are prost's business")]
    tonic::include_proto!("ztrust.observer.v1");
}

pub use hub::{Hub, HubOptions};
pub use server::{ServeOptions, TlsFiles};
