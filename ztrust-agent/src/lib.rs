//! ztrust agent: sources → pure policy engine → datapath sync, plus the lab.
pub mod model;
pub mod policy;
pub mod source;
pub mod lab;
pub mod datapath;
pub mod agent;
pub mod cli_flows;
pub mod flows;
pub mod netif;
pub mod status;
pub mod telemetry;
pub mod observer;
pub mod metrics;
pub mod detector;
