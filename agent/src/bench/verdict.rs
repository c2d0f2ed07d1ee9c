//! Whether paired on/off rounds show a cost under a target: the median of
//! the per-round ratios, a distribution-free confidence interval for it,
//! and a verdict that says "inconclusive" when that interval straddles the
//! target rather than guessing.

/// Confidence asked of the interval around the median ratio.
pub const CONFIDENCE: f64 = 0.90;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    Met,
    NotMet,
    /// The interval holds both sides of the target: more rounds or a
    /// quieter machine would be needed to tell.
    Inconclusive,
    /// Fewer rounds than any interval at [`CONFIDENCE`] needs (5).
    TooFewRounds,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::NotMet => "NOT met",
            Verdict::Inconclusive => "inconclusive: the rounds spread across the target",
            Verdict::TooFewRounds => "inconclusive: too few rounds for a confidence interval",
        }
    }
}

/// What a set of on/off ratios says about a cost target.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Assessment {
    pub median: f64,
    /// Lowest and highest ratio of all rounds.
    pub range: (f64, f64),
    /// Interval for the median ratio and its confidence, when there are
    /// enough rounds.
    pub interval: Option<(f64, f64, f64)>,
    pub verdict: Verdict,
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// P(X ≤ k) for X ~ Binomial(n, 1/2).
fn binomial_half_cdf(n: usize, k: usize) -> f64 {
    let mut term = 1.0; // C(n, 0)
    let mut sum = 0.0;
    for i in 0..=k.min(n) {
        if i > 0 {
            term = term * (n + 1 - i) as f64 / i as f64;
        }
        sum += term;
    }
    sum / 2f64.powi(n as i32)
}

/// The narrowest interval [x(k), x(n+1-k)] of the sorted values that holds
/// the true median with at least [`CONFIDENCE`] (the sign test: no
/// assumption about how the noise is distributed), with its confidence.
pub fn median_interval(v: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let coverage = |k: usize| 1.0 - 2.0 * binomial_half_cdf(n, k - 1);
    let k = (1..=n / 2)
        .take_while(|&k| coverage(k) >= CONFIDENCE)
        .last()?;
    Some((v[k - 1], v[n - k], coverage(k)))
}

/// Judges ratios on/off (1.0 = no cost) against "costs less than
/// `max_cost`" (0.03 for 3%).
pub fn assess(ratios: &[f64], max_cost: f64) -> Assessment {
    let line = 1.0 - max_cost;
    let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let interval = median_interval(ratios);
    let verdict = match interval {
        None => Verdict::TooFewRounds,
        Some((l, _, _)) if l >= line => Verdict::Met,
        Some((_, h, _)) if h < line => Verdict::NotMet,
        Some(_) => Verdict::Inconclusive,
    };
    Assessment {
        median: median(ratios),
        range: (lo, hi),
        interval,
        verdict,
    }
}

/// Judges ratios against "at least `line`" (e.g. 1.3× the comparison).
pub fn assess_at_least(ratios: &[f64], line: f64) -> Assessment {
    assess(ratios, 1.0 - line)
}

/// Judges ratios against "at most `line`" (e.g. half the comparison's CPU):
/// met when the whole interval lies at or below it.
pub fn assess_at_most(ratios: &[f64], line: f64) -> Assessment {
    let mirrored: Vec<f64> = ratios.iter().map(|r| -r).collect();
    let a = assess(&mirrored, 1.0 + line);
    Assessment {
        median: -a.median,
        range: (-a.range.1, -a.range.0),
        interval: a.interval.map(|(lo, hi, c)| (-hi, -lo, c)),
        verdict: a.verdict,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn intervals_follow_the_sign_test() {
        // 4 rounds: even the full range covers the median with 87.5% only.
        assert_eq!(median_interval(&[1.0, 2.0, 3.0, 4.0]), None);
        // 5 rounds: the full range, 1 - 2/32.
        let (lo, hi, c) = median_interval(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!((lo, hi), (1.0, 5.0));
        assert!((c - 0.9375).abs() < 1e-12);
        // 9 rounds: the extremes can go, 1 - 2·10/512.
        let v: Vec<f64> = (1..=9).map(f64::from).collect();
        let (lo, hi, c) = median_interval(&v).unwrap();
        assert_eq!((lo, hi), (2.0, 8.0));
        assert!((c - 0.9609375).abs() < 1e-12);
    }

    #[test]
    fn met_only_when_the_whole_interval_clears_the_target() {
        let a = assess(&[0.99, 0.98, 1.01, 0.975, 1.0], 0.03);
        assert_eq!(a.verdict, Verdict::Met);
        assert_eq!(a.median, 0.99);
        assert_eq!(a.range, (0.975, 1.01));
        // A single low round keeps a good median from passing.
        let a = assess(&[0.99, 0.98, 1.01, 0.90, 1.0], 0.03);
        assert_eq!(a.verdict, Verdict::Inconclusive);
    }

    #[test]
    fn not_met_when_the_whole_interval_is_below() {
        let a = assess(&[0.90, 0.92, 0.95, 0.91, 0.93], 0.03);
        assert_eq!(a.verdict, Verdict::NotMet);
    }

    #[test]
    fn wild_rounds_are_inconclusive_whatever_the_median() {
        let a = assess(&[0.92, 16.0, 1.43, 1.2, 0.95], 0.03);
        assert_eq!(a.verdict, Verdict::Inconclusive);
        assert_eq!(
            assess(&[1.0, 1.0, 1.0], 0.03).verdict,
            Verdict::TooFewRounds
        );
    }

    #[test]
    fn targets_above_and_below_one() {
        let high = [8.5, 9.0, 10.0, 8.2, 9.5];
        assert_eq!(assess_at_least(&high, 8.0).verdict, Verdict::Met);
        assert_eq!(assess_at_least(&high, 9.0).verdict, Verdict::Inconclusive);
        assert_eq!(assess_at_least(&high, 11.0).verdict, Verdict::NotMet);
        let low = [0.3, 0.4, 0.35, 0.45, 0.38];
        let a = assess_at_most(&low, 0.5);
        assert_eq!(a.verdict, Verdict::Met);
        assert_eq!(a.median, 0.38);
        assert_eq!(a.range, (0.3, 0.45));
        assert_eq!(a.interval.map(|(l, h, _)| (l, h)), Some((0.3, 0.45)));
        assert_eq!(assess_at_most(&low, 0.4).verdict, Verdict::Inconclusive);
        assert_eq!(assess_at_most(&low, 0.2).verdict, Verdict::NotMet);
    }
}
