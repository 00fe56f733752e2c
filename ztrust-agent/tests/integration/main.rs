//! The agent's unprivileged integration tests, one binary: the Kubernetes source against a fake API
//! server, the observer's gRPC, TLS, metrics and CLI, bad input on its sockets. No root needed; the
//! privileged tests are in the `ztrust-tests` crate (`tests/tests/privileged`).

mod fake_apiserver;

mod adversarial_input;
mod kube_source;
mod lint_cli;
mod observer_cli;
mod observer_grpc;
mod observer_metrics;
mod observer_tls;
