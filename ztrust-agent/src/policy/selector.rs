//! Label selector matching.

use crate::model::{LabelSelector, Labels, Operator};

/// Whether `labels` satisfy `sel`: every `matchLabels` pair and every requirement ("ANDed"), so the
/// empty selector matches everything.
/// <https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/label-selector/>
pub fn matches(sel: &LabelSelector, labels: &Labels) -> bool {
    sel.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
        && sel.match_expressions.iter().all(|r| {
            let value = labels.get(&r.key);
            match r.operator {
                Operator::In => value.is_some_and(|v| r.values.contains(v)),
                // As in apimachinery's `labels.Requirement.Matches`: NotIn also matches an absent key.
                Operator::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                Operator::Exists => value.is_some(),
                Operator::DoesNotExist => value.is_none(),
            }
        })
}
