//! `ztrust-agent explain FROM TO:PORT[/PROTOCOL]`: asks the agent on the node (its flow API) and prints
//! the answer as a table or JSON. Exit status: 0 the connection goes through (allowed, or only a
//! would-drop of audit mode), 1 it is dropped, 2 the query or the agent failed, 3 the kernel maps (or the
//! policy objects) differ from the agent's compiled state.

use clap::ValueEnum;

use crate::cli_flows::{Connect, Error as FlowsError};
use crate::explain::{Explanation, Query, QueryError, render};
use crate::observer::explain::{Invalid, explanation_from_proto, query_to_proto};
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
    pub from: String,
    /// The destination and its port: `namespace/name:PORT[/PROTOCOL]`, `ADDRESS:PORT[/PROTOCOL]`
    /// (`[ADDRESS]:PORT` for IPv6; a Service's ClusterIP is judged by its backends). TCP by default.
    pub to: String,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub connect: Connect,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Query(#[from] QueryError),
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

/// Asks the agent behind `connect`.
pub async fn ask(connect: &Connect, query: &Query) -> Result<Explanation, Error> {
    let mut client: ObserverClient<_> = connect.client().await?;
    let answer = client
        .explain(query_to_proto(query))
        .await
        .map_err(Error::Refused)?
        .into_inner();
    explanation_from_proto(&answer).map_err(Error::Answer)
}

/// Runs the command: prints the answer, returns what the exit status says.
pub fn run(args: &ExplainArgs) -> Result<Outcome, Error> {
    let query = Query::parse(&args.from, &args.to)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let x = rt.block_on(ask(&args.connect, &query))?;
    match args.output {
        Output::Table => print!("{}", render(&x)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&x)?),
    }
    Ok(Outcome::of(&x))
}
