//! Kubernetes Events about the problems of NetworkPolicies.

use super::*;

/// Events are at most 1 kB of note.
const NOTE_MAX: usize = 1024;

pub(super) async fn publish_events(
    client: Client,
    reporter: Reporter,
    mut rx: mpsc::UnboundedReceiver<(ObjectReference, String)>,
) {
    let _ = api_call::<k8s_openapi::api::events::v1::Event>("create");
    while let Some((reference, mut note)) = rx.recv().await {
        if note.len() > NOTE_MAX {
            let mut cut = NOTE_MAX - 3;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
            note.push_str("...");
        }
        // A new Recorder each time: its own cache would turn a second problem set of the same policy
        // into a patch of the first Event (keyed without the note), losing the new message. The source
        // deduplicates before sending here.
        let recorder = Recorder::new(client.clone(), reporter.clone());
        let event = Event {
            type_: EventType::Warning,
            reason: "PolicyNotFullyEnforced".into(),
            note: Some(note),
            action: "Enforce".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &reference).await {
            warn!(object = ?reference.name, error = %e, "cannot publish an Event");
        }
    }
}
