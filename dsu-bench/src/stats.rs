//! Order statistics of a sample: what every figure of the benchmark reports.

use serde_json::{Value, json};

/// Minimum, median, 99th percentile, maximum and mean of a sample (nearest-rank percentiles).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// Summarises `samples`; all zero for an empty sample.
    pub fn of(samples: &[f64]) -> Summary {
        if samples.is_empty() {
            return Summary {
                n: 0,
                min: 0.0,
                p50: 0.0,
                p99: 0.0,
                max: 0.0,
                mean: 0.0,
            };
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        Summary {
            n: s.len(),
            min: s[0],
            p50: percentile(&s, 50.0),
            p99: percentile(&s, 99.0),
            max: s[s.len() - 1],
            mean: s.iter().sum::<f64>() / s.len() as f64,
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "n": self.n,
            "min": round3(self.min),
            "p50": round3(self.p50),
            "p99": round3(self.p99),
            "max": round3(self.max),
            "mean": round3(self.mean),
        })
    }
}

/// Nearest-rank percentile `p` (0..=100) of `sorted` (ascending, non-empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Three decimals, enough for microseconds and nanoseconds alike.
pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Microseconds of a duration, as a float.
pub fn us(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        let sum = Summary::of(&s);
        assert_eq!(
            (sum.min, sum.p50, sum.p99, sum.max),
            (1.0, 50.0, 99.0, 100.0)
        );
        assert_eq!(Summary::of(&[7.0]).p99, 7.0);
        assert_eq!(Summary::of(&[]).n, 0);
    }
}
