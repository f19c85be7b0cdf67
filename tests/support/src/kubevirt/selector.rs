//! Label selectors as apimachinery evaluates and prints them
//! (`metav1.LabelSelectorAsSelector`, `labels.Selector.String()`), and
//! KubeVirt's node-selector-requirement matcher.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Equals,
    In,
    NotIn,
    Exists,
    DoesNotExist,
    Gt,
    Lt,
}

#[derive(Clone, Debug)]
struct Requirement {
    key: String,
    op: Op,
    values: Vec<String>,
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let v = labels.get(&self.key);
        match self.op {
            Op::Equals | Op::In => v.is_some_and(|v| self.values.contains(v)),
            Op::NotIn => v.is_none_or(|v| !self.values.contains(v)),
            Op::Exists => v.is_some(),
            Op::DoesNotExist => v.is_none(),
            Op::Gt | Op::Lt => {
                let (Some(have), Some(want)) = (
                    v.and_then(|v| v.parse::<i64>().ok()),
                    self.values.first().and_then(|w| w.parse::<i64>().ok()),
                ) else {
                    return false;
                };
                if self.op == Op::Gt {
                    have > want
                } else {
                    have < want
                }
            }
        }
    }

    fn render(&self) -> String {
        let mut vals = self.values.clone();
        vals.sort();
        match self.op {
            Op::Equals => format!("{}={}", self.key, vals.join(",")),
            Op::In => format!("{} in ({})", self.key, vals.join(",")),
            Op::NotIn => format!("{} notin ({})", self.key, vals.join(",")),
            Op::Exists => self.key.clone(),
            Op::DoesNotExist => format!("!{}", self.key),
            Op::Gt => format!("{}>{}", self.key, vals.join(",")),
            Op::Lt => format!("{}<{}", self.key, vals.join(",")),
        }
    }
}

/// A parsed selector. `None` inside means "nothing" (a null LabelSelector).
#[derive(Clone, Debug)]
pub(crate) struct Selector(Option<Vec<Requirement>>);

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

impl Selector {
    /// From a `metav1.LabelSelector`: null selects nothing, `{}` everything.
    pub(crate) fn from_label_selector(v: &Value) -> Result<Selector> {
        if v.is_null() {
            return Ok(Selector(None));
        }
        let mut reqs = Vec::new();
        if let Some(ml) = v["matchLabels"].as_object() {
            for (k, val) in ml {
                let Some(val) = val.as_str() else {
                    bail!("matchLabels[{k}] is not a string")
                };
                reqs.push(Requirement {
                    key: k.clone(),
                    op: Op::Equals,
                    values: vec![val.into()],
                });
            }
        }
        for e in v["matchExpressions"].as_array().into_iter().flatten() {
            let key = e["key"].as_str().unwrap_or_default().to_string();
            let values = strings(&e["values"]);
            let op = match e["operator"].as_str().unwrap_or_default() {
                "In" => Op::In,
                "NotIn" => Op::NotIn,
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => bail!("{other:?} is not a valid label selector operator"),
            };
            match op {
                Op::In | Op::NotIn if values.is_empty() => {
                    bail!(
                        "values: Invalid value: for 'in', 'notin' operators, values set can't be empty"
                    )
                }
                Op::Exists | Op::DoesNotExist if !values.is_empty() => {
                    bail!(
                        "values: Invalid value: values set must be empty for exists and does not exist"
                    )
                }
                _ => {}
            }
            reqs.push(Requirement { key, op, values });
        }
        reqs.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Selector(Some(reqs)))
    }

    /// From a list of `NodeSelectorRequirement`s (KubeVirt's
    /// `nodeSelectorRequirementsAsSelector`).
    pub(crate) fn from_node_selector_requirements(v: &Value) -> Result<Selector> {
        let mut reqs = Vec::new();
        for e in v.as_array().into_iter().flatten() {
            let key = e["key"].as_str().unwrap_or_default().to_string();
            let values = strings(&e["values"]);
            let op = match e["operator"].as_str().unwrap_or_default() {
                "In" => Op::In,
                "NotIn" => Op::NotIn,
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                "Gt" => Op::Gt,
                "Lt" => Op::Lt,
                other => bail!("{other:?} is not a valid node selector operator"),
            };
            reqs.push(Requirement { key, op, values });
        }
        reqs.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Selector(Some(reqs)))
    }

    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match &self.0 {
            None => false,
            Some(reqs) => reqs.iter().all(|r| r.matches(labels)),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.as_ref().is_some_and(|r| r.is_empty())
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => Ok(()),
            Some(reqs) => {
                let parts: Vec<String> = reqs.iter().map(Requirement::render).collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selector_matches_and_prints_like_apimachinery() {
        let s = Selector::from_label_selector(&json!({
            "matchLabels": {"pool": "a", "app": "runner"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["y", "x"]},
                {"key": "gone", "operator": "DoesNotExist"},
            ],
        }))
        .unwrap();
        assert_eq!(s.to_string(), "app=runner,!gone,pool=a,tier in (x,y)");
        assert!(s.matches(&map(&[("pool", "a"), ("app", "runner"), ("tier", "x")])));
        assert!(!s.matches(&map(&[("pool", "a"), ("app", "runner"), ("tier", "z")])));
        assert!(!s.matches(&map(&[
            ("pool", "a"),
            ("app", "runner"),
            ("tier", "x"),
            ("gone", "1")
        ])));
        assert!(
            Selector::from_label_selector(&json!({}))
                .unwrap()
                .matches(&map(&[]))
        );
        assert!(
            !Selector::from_label_selector(&Value::Null)
                .unwrap()
                .matches(&map(&[]))
        );
        assert!(
            Selector::from_label_selector(
                &json!({"matchExpressions": [{"key": "k", "operator": "In"}]})
            )
            .is_err()
        );
    }

    #[test]
    fn node_selector_requirements_compare_numbers() {
        let s = Selector::from_node_selector_requirements(&json!([
            {"key": "cpus", "operator": "Gt", "values": ["4"]},
            {"key": "zone", "operator": "NotIn", "values": ["b"]},
        ]))
        .unwrap();
        assert!(s.matches(&map(&[("cpus", "8"), ("zone", "a")])));
        assert!(!s.matches(&map(&[("cpus", "4")])));
        assert!(!s.matches(&map(&[("cpus", "16"), ("zone", "b")])));
    }
}
