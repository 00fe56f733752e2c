//! ztrust agent: sources → pure policy engine → datapath sync, plus the lab.
pub mod agent;
pub mod cli_flows;
pub mod datapath;
pub mod detector;
pub mod flows;
pub mod health;
pub mod lab;
pub mod labels;
pub mod metrics;
pub mod model;
pub mod netif;
pub mod observer;
pub mod policy;
pub mod source;
pub mod status;
pub mod telemetry;
