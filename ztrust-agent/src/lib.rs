//! ztrust agent: sources → pure policy engine → datapath sync, the flow observer and the CLI's clients.
//! The lab is a crate of its own (`ztrust-lab`), not part of the agent's binary.
pub mod agent;
pub mod cli_explain;
pub mod cli_flows;
pub mod datapath;
pub mod detector;
pub mod explain;
pub mod flows;
pub mod health;
pub mod labels;
pub mod lint;
pub mod metrics;
pub mod model;
pub mod netif;
pub mod observer;
pub mod otlp;
pub mod policy;
pub mod source;
pub mod status;
pub mod suggest;
pub mod telemetry;
pub mod whatif;
