//! The payments lab with the real agent enforcing, for the privileged end-to-end tests: brought up with
//! names of its own (so tests never collide with each other or with a user's lab), policies applied,
//! and taken down by `Drop` however the test ends.

#![allow(dead_code, reason = "each test binary uses a different part")]

use std::path::{Path, PathBuf};

use ztrust_agent::lab::{self, ApplyOptions, DownOptions, LabState, UpOptions};

pub const AGENT: &str = env!("CARGO_BIN_EXE_ztrust-agent");

pub fn payments() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/payments")
}

pub struct PaymentsLab {
    pub state_dir: PathBuf,
    pub prefix: String,
    /// The lab as it stands after the policies were applied.
    pub state: LabState,
}

impl PaymentsLab {
    /// `tag` (two or three letters) keeps names apart; `agent_bin` runs the agent (a wrapper, or
    /// [`AGENT`]); `extra_args` go to `ztrust-agent run`.
    pub fn up(tag: &str, agent_bin: &Path, extra_args: &[&str]) -> Self {
        assert!(nix::unistd::geteuid().is_root(), "needs root: run by `cargo xtask test`");
        std::fs::create_dir_all("/run/ztrust").unwrap();
        let prefix = format!("{tag}{}", std::process::id() % 10_000);
        let state_dir = PathBuf::from(format!("/run/ztrust/{tag}-test-{}", std::process::id()));
        // The guard exists before anything is made, so a failing `up` is cleaned up too.
        let mut me = Self { state_dir: state_dir.clone(), prefix: prefix.clone(), state: LabState::default() };
        lab::up(
            &payments().join("cluster.yaml"),
            UpOptions {
                state_dir: state_dir.clone(),
                prefix: prefix.clone(),
                if_prefix: format!("{prefix}l"),
                ext_if_prefix: format!("{prefix}x"),
                agent_bin: Some(AGENT.into()),
                agent: Some(lab::AgentSpec {
                    bin: Some(agent_bin.to_owned()),
                    extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .expect("lab up");
        me.apply(&payments().join("policies"));
        me
    }

    pub fn apply(&mut self, path: &Path) {
        lab::apply(path, ApplyOptions { state_dir: self.state_dir.clone(), ..Default::default() }).expect("lab apply");
        self.state = lab::status(&self.state_dir).expect("lab status");
    }

    pub fn pod(&self, name: &str) -> lab::PodState {
        self.state.pods.iter().find(|p| p.name == name).expect("pod").clone()
    }

    pub fn agent(&self) -> lab::AgentState {
        self.state.agent.clone().expect("the lab runs an agent")
    }
}

impl Drop for PaymentsLab {
    fn drop(&mut self) {
        let _ = lab::down(&DownOptions { state_dir: self.state_dir.clone(), prefix: self.prefix.clone() });
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}
