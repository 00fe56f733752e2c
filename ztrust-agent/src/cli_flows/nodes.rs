//! `flows` of several nodes at once (the lab's nodes, each agent's socket): one answer, in time order,
//! with the node that judged each flow.

use futures::StreamExt as _;

use super::{Connect, FlowsArgs, GetFlowsRequest, Printer, Result, convert, get_flows_response, report_lost};
use crate::flows::Flow;

/// Asks every agent of `nodes` the same question and prints their flows together: a NODE column (the
/// compact line starts with the node); the JSON outputs carry `node` as every flow does. Without
/// `--follow`, the answers merged by time (`--last N`: the last N of all); with it, flows as they come
/// from any node. With one node, what [`super::run`] prints of an agent.
pub fn run_nodes(args: &FlowsArgs, nodes: &[Connect]) -> Result<()> {
    stream(args, &args.request()?, nodes)
}

/// `req` asked of every agent of `connects`, the answers printed (a NODE column with more than one).
pub(super) fn stream(args: &FlowsArgs, req: &GetFlowsRequest, connects: &[Connect]) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut streams = Vec::new();
        for c in connects {
            let mut client = c.client().await?;
            streams.push(client.get_flows(req.clone()).await?.into_inner());
        }
        let mut printer = Printer::new(args.output).with_ids();
        printer.nodes = connects.len() > 1;
        let stdout = std::io::stdout();
        let mut merged = futures::stream::select_all(streams);
        if !args.follow {
            // Size the table to the whole answer before printing it.
            let mut flows: Vec<(Option<u64>, Flow)> = Vec::new();
            while let Some(r) = merged.next().await {
                match r?.response_types {
                    Some(get_flows_response::ResponseTypes::Flow(f)) => {
                        flows.push(((f.id != 0).then_some(f.id), convert::flow_from_proto(&f)))
                    }
                    Some(get_flows_response::ResponseTypes::LostEvents(l)) => report_lost(&l),
                    None => {}
                }
            }
            // Several agents' answers merged by time (one agent's is printed in its own order).
            if connects.len() > 1 {
                flows.sort_by_key(|(_, f)| f.time);
            }
            if req.number > 0 {
                let skip = flows
                    .len()
                    .saturating_sub(usize::try_from(req.number).unwrap_or(usize::MAX));
                flows.drain(..skip);
            }
            if let Some(max) = flows.iter().filter_map(|(id, _)| *id).max() {
                printer.id_width = printer.id_width.max(max.to_string().len());
            }
            let (ids, flows): (Vec<Option<u64>>, Vec<Flow>) = flows.into_iter().unzip();
            printer.fit(&flows);
            let mut out = stdout.lock();
            for (f, id) in flows.iter().zip(ids) {
                printer.flow(&mut out, f, id)?;
            }
            return printer.finish(&mut out);
        }
        while let Some(r) = merged.next().await {
            match r?.response_types {
                Some(get_flows_response::ResponseTypes::Flow(f)) => {
                    let mut out = stdout.lock();
                    printer.flow(
                        &mut out,
                        &convert::flow_from_proto(&f),
                        (f.id != 0).then_some(f.id),
                    )?;
                    std::io::Write::flush(&mut out)?;
                }
                Some(get_flows_response::ResponseTypes::LostEvents(l)) => report_lost(&l),
                None => {}
            }
        }
        printer.finish(&mut stdout.lock())
    })
}
