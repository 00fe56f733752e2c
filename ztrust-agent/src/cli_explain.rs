//! `ztrust-agent explain FROM TO:PORT[/PROTOCOL]`: asks the agent on the node (its flow API) and prints
//! the answer as a table or JSON. Exit status: 0 the connection goes through (allowed, or only a
//! would-drop of audit mode), 1 it is dropped, 2 the query or the agent failed, 3 the kernel maps (or the
//! policy objects) differ from the agent's compiled state.

use clap::ValueEnum;

use crate::cli_flows::{Connect, Error as FlowsError};
use crate::explain::{Explanation, Query, QueryError, render};
use crate::observer::explain::{Invalid, explanation_from_proto, flow_query_to_proto, query_to_proto};
use crate::observer::proto::observer_client::ObserverClient;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// The connection, a line per hook, then each hook's reasons.
    Table,
    /// The whole answer as one JSON object.
    Json,
}

#[derive(clap::Args, Debug)]
pub struct ExplainArgs {
    /// The source: a pod (`namespace/name`) or an address.
    #[arg(required_unless_present = "flow", requires = "to")]
    pub from: Option<String>,
    /// The destination and its port: `namespace/name:PORT[/PROTOCOL]`, `ADDRESS:PORT[/PROTOCOL]`
    /// (`[ADDRESS]:PORT` for IPv6; a Service's ClusterIP is judged by its backends). TCP by default.
    pub to: Option<String>,
    /// Instead of FROM and TO: the connection of this flow (the ID column of `flows`), from its source
    /// to its destination's port, while the agent still keeps it.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    pub flow: Option<u64>,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub connect: Connect,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error("give FROM and TO, or --flow ID")]
    Usage,
    #[error(transparent)]
    Connect(#[from] FlowsError),
    #[error("{}", .0.message())]
    Refused(tonic::Status),
    #[error("the agent's answer cannot be read")]
    Answer(#[source] Invalid),
    #[error("encoding JSON")]
    Json(#[from] serde_json::Error),
    #[error("starting the client")]
    Runtime(#[from] std::io::Error),
}

/// What the command's exit status says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passes,
    Dropped,
    Inconsistent,
}

impl Outcome {
    pub fn of(x: &Explanation) -> Self {
        if !x.consistent() {
            Outcome::Inconsistent
        } else if x.verdict == crate::flows::Verdict::Dropped {
            Outcome::Dropped
        } else {
            Outcome::Passes
        }
    }

    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Passes => 0,
            Outcome::Dropped => 1,
            Outcome::Inconsistent => 3,
        }
    }
}

/// What to explain: a connection, or a kept flow's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ask {
    Query(Query),
    Flow(u64),
}

/// Asks the agent behind `connect`.
pub async fn ask(connect: &Connect, what: &Ask) -> Result<Explanation, Error> {
    let mut client: ObserverClient<_> = connect.client().await?;
    let request = match what {
        Ask::Query(q) => query_to_proto(q),
        Ask::Flow(id) => flow_query_to_proto(*id),
    };
    let answer = client
        .explain(request)
        .await
        .map_err(Error::Refused)?
        .into_inner();
    explanation_from_proto(&answer).map_err(Error::Answer)
}

/// Runs the command: prints the answer, returns what the exit status says.
pub fn run(args: &ExplainArgs) -> Result<Outcome, Error> {
    let x = answer(args)?;
    match args.output {
        Output::Table => print!("{}", render(&x)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&x)?),
    }
    Ok(Outcome::of(&x))
}

/// The agent's answer to `args`, not printed.
pub fn answer(args: &ExplainArgs) -> Result<Explanation, Error> {
    let what = match (&args.flow, &args.from, &args.to) {
        (Some(id), _, _) => Ask::Flow(*id),
        (None, Some(from), Some(to)) => Ask::Query(Query::parse(from, to)?),
        // clap requires FROM and TO without --flow.
        _ => return Err(Error::Usage),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(ask(&args.connect, &what))
}
