//! The flows `what-if` and `suggest` replay: a flow log's, or what the agent's ring holds.

use super::*;

/// The flows of a flow log (JSON lines) that `wanted` keeps (lines that are no flow are skipped), and
/// the offset read up to (where following it goes on).
pub(super) fn read_flow_log(
    path: &std::path::Path,
    wanted: impl Fn(&Flow) -> bool,
) -> Result<(Vec<Flow>, u64)> {
    let mut file = std::fs::File::open(path).map_err(|source| Error::FlowLog {
        path: path.to_owned(),
        source,
    })?;
    let mut reader = BufReader::new(&mut file);
    let mut flows: Vec<Flow> = Vec::new();
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 {
        if let Ok(f) = serde_json::from_str::<Flow>(&line)
            && wanted(&f)
        {
            flows.push(f);
        }
        line.clear();
    }
    Ok((flows, reader.stream_position()?))
}

/// Every flow recorded since `since` (a duration ago or a time; all when `None`): from the flow log at
/// `flow_log`, else from the agent behind `connect` (what its ring still holds).
pub fn recorded_flows(
    connect: &Connect,
    flow_log: Option<&std::path::Path>,
    since: Option<&str>,
) -> Result<Vec<Flow>> {
    let since = since.map(parse_when).transpose()?;
    if let Some(path) = flow_log {
        return read_flow_log(path, |f| since.is_none_or(|s| f.time >= s)).map(|(flows, _)| flows);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut client = connect.client().await?;
        let req = GetFlowsRequest {
            number: 0,
            since: Some(convert::timestamp(since.unwrap_or(SystemTime::UNIX_EPOCH))),
            typed_only: true,
            ..Default::default()
        };
        let mut stream = client.get_flows(req).await?.into_inner();
        let mut flows = Vec::new();
        while let Some(r) = stream.next().await {
            match r?.response_types {
                Some(get_flows_response::ResponseTypes::Flow(f)) => flows.push(convert::flow_from_proto(&f)),
                Some(get_flows_response::ResponseTypes::LostEvents(l)) => report_lost(&l),
                None => {}
            }
        }
        Ok(flows)
    })
}
