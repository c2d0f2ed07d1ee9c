//! `portcullis_policy_apply_seconds` (and the per-stage
//! `portcullis_policy_pass_stage_seconds`) as the agent's /metrics serves
//! them: read before and after a change, the difference is that change's
//! passes. Pure text parsing and percentile arithmetic.

use std::collections::BTreeMap;

const NAME: &str = "portcullis_policy_apply_seconds";
const STAGES: &str = "portcullis_policy_pass_stage_seconds";
const PASSES: &str = "portcullis_policy_applies_total{";

/// One reading of the histogram: cumulative bucket counts by upper bound,
/// the sum of observed seconds and their count.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reading {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
    /// Where those passes' time went.
    pub stages: StageTotals,
    /// Successful passes, those that changed nothing in the kernel (and
    /// so are not in the histogram) included: the agent took an event.
    pub passes: u64,
}

/// Seconds and passes by stage (`load`, `compile`, ...).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StageTotals(pub BTreeMap<String, (f64, u64)>);

impl StageTotals {
    fn parse(text: &str) -> Self {
        let mut totals = StageTotals::default();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(STAGES) else {
                continue;
            };
            let (sum, rest) = match (rest.strip_prefix("_sum{"), rest.strip_prefix("_count{")) {
                (Some(rest), _) => (true, rest),
                (_, Some(rest)) => (false, rest),
                _ => continue,
            };
            let Some(stage) = rest
                .split("stage=\"")
                .nth(1)
                .and_then(|v| v.split('"').next())
            else {
                continue;
            };
            let Ok(value) = rest.rsplit(' ').next().unwrap_or_default().parse::<f64>() else {
                continue;
            };
            let entry = totals.0.entry(stage.to_string()).or_default();
            match sum {
                true => entry.0 = value,
                false => entry.1 = value as u64,
            }
        }
        totals
    }

    /// What was observed between `earlier` and these totals.
    pub fn since(&self, earlier: &StageTotals) -> StageTotals {
        StageTotals(
            self.0
                .iter()
                .map(|(stage, (sum, count))| {
                    let (s0, c0) = earlier.0.get(stage).copied().unwrap_or_default();
                    (stage.clone(), (sum - s0, count.saturating_sub(c0)))
                })
                .collect(),
        )
    }

    /// Both together.
    pub fn add(&mut self, other: &StageTotals) {
        for (stage, (sum, count)) in &other.0 {
            let entry = self.0.entry(stage.clone()).or_default();
            entry.0 += sum;
            entry.1 += count;
        }
    }

    /// Mean seconds per pass of `stage`; `None` if no pass was timed.
    pub fn mean(&self, stage: &str) -> Option<f64> {
        match self.0.get(stage) {
            Some((sum, count)) if *count > 0 => Some(sum / *count as f64),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HistogramError {
    #[error("no {NAME}_count in the agent's /metrics")]
    Missing,
}

impl Reading {
    /// Parses the Prometheus or OpenMetrics text form.
    pub fn parse(text: &str) -> Result<Self, HistogramError> {
        let mut reading = Reading::default();
        let mut counted = false;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(NAME) else {
                continue;
            };
            let value = rest.rsplit(' ').next().unwrap_or_default();
            if let Some(labels) = rest.strip_prefix("_bucket{") {
                let le = labels
                    .split("le=\"")
                    .nth(1)
                    .and_then(|v| v.split('"').next())
                    .map(|v| {
                        if v == "+Inf" {
                            f64::INFINITY
                        } else {
                            v.parse().unwrap_or(f64::NAN)
                        }
                    });
                if let (Some(le), Ok(n)) = (le, value.parse::<f64>()) {
                    reading.buckets.push((le, n as u64));
                }
            } else if rest.starts_with("_sum") {
                reading.sum = value.parse().unwrap_or_default();
            } else if rest.starts_with("_count") {
                reading.count = value.parse::<f64>().map(|n| n as u64).unwrap_or_default();
                counted = true;
            }
        }
        reading.stages = StageTotals::parse(text);
        reading.passes = text
            .lines()
            .filter_map(|l| l.strip_prefix(PASSES))
            .filter(|l| {
                l.starts_with("result=\"success\"") || l.starts_with("result=\"unchanged\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|n| n as u64)
            .sum();
        match counted {
            true => Ok(reading),
            false => Err(HistogramError::Missing),
        }
    }

    /// What was observed between `earlier` and this reading.
    pub fn since(&self, earlier: &Reading) -> Reading {
        let before = |le: f64| {
            earlier
                .buckets
                .iter()
                .find(|(l, _)| *l == le)
                .map_or(0, |(_, n)| *n)
        };
        Reading {
            buckets: self
                .buckets
                .iter()
                .map(|(le, n)| (*le, n.saturating_sub(before(*le))))
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count.saturating_sub(earlier.count),
            stages: self.stages.since(&earlier.stages),
            passes: self.passes.saturating_sub(earlier.passes),
        }
    }

    /// The upper bound of the bucket holding quantile `q` (0–1): what the
    /// histogram alone can say.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        self.buckets
            .iter()
            .find(|(_, n)| *n >= rank)
            .map(|(le, _)| *le)
    }
}

/// Quantile `q` of exact values (nearest rank).
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    let mut sorted: Vec<f64> = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE portcullis_policy_apply_seconds histogram\n\
        portcullis_policy_apply_seconds_sum 0.75\n\
        portcullis_policy_apply_seconds_count 3\n\
        portcullis_policy_apply_seconds_bucket{le=\"0.005\"} 1\n\
        portcullis_policy_apply_seconds_bucket{le=\"0.5\"} 2\n\
        portcullis_policy_apply_seconds_bucket{le=\"+Inf\"} 3\n\
        portcullis_policy_applies_total{result=\"success\"} 3\n\
        portcullis_policy_applies_total{result=\"unchanged\"} 2\n\
        portcullis_policy_applies_total{result=\"failure\"} 7\n\
        portcullis_policy_pass_stage_seconds_bucket{le=\"0.05\",stage=\"compile\"} 3\n\
        portcullis_policy_pass_stage_seconds_sum{stage=\"compile\"} 0.12\n\
        portcullis_policy_pass_stage_seconds_count{stage=\"compile\"} 3\n\
        portcullis_policy_pass_stage_seconds_sum{stage=\"load\"} 0.03\n\
        portcullis_policy_pass_stage_seconds_count{stage=\"load\"} 3\n";

    #[test]
    fn a_difference_of_readings_is_what_happened_between() {
        let after = Reading::parse(TEXT).unwrap();
        let before = Reading {
            buckets: vec![(0.005, 1), (0.5, 1), (f64::INFINITY, 1)],
            sum: 0.004,
            count: 1,
            stages: StageTotals(BTreeMap::from([("compile".to_string(), (0.02, 1))])),
            passes: 1,
        };
        assert_eq!(
            after.passes, 5,
            "written and unchanged passes, not failures"
        );
        let d = after.since(&before);
        assert_eq!(d.count, 2);
        assert_eq!(d.passes, 4);
        assert!((d.stages.mean("compile").unwrap() - 0.05).abs() < 1e-9);
        assert!((d.stages.mean("load").unwrap() - 0.01).abs() < 1e-9);
        assert_eq!(d.stages.mean("write"), None, "not served: no mean");
        let mut both = d.stages.clone();
        both.add(&d.stages);
        assert!((both.mean("compile").unwrap() - 0.05).abs() < 1e-9);
        assert_eq!(both.0["compile"].1, 4);
        assert!((d.sum - 0.746).abs() < 1e-9);
        assert_eq!(d.quantile_bound(0.5), Some(0.5));
        assert_eq!(d.quantile_bound(0.99), Some(f64::INFINITY));
    }

    #[test]
    fn no_histogram_is_an_error_and_quantiles_use_nearest_rank() {
        assert!(Reading::parse("other 1\n").is_err());
        let v = [0.004, 0.001, 0.002, 0.003];
        assert_eq!(quantile(&v, 0.5), Some(0.002));
        assert_eq!(quantile(&v, 0.99), Some(0.004));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
