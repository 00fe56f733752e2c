//! ztrust agent: sources → pure policy engine → datapath sync, plus the lab.
pub mod model;
pub mod policy;
pub mod source;
pub mod lab;
pub mod datapath;
pub mod observer;
pub mod metrics;
pub mod detector;
