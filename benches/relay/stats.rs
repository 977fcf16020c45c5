//! Medians, percentiles and the collected figures of a run.

use std::collections::BTreeMap;

/// Median of the values (mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile `p` (0..=100) of latencies in nanoseconds, in milliseconds.
pub fn percentile_ms(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted_ns.len() as f64).ceil() as usize;
    sorted_ns[rank.clamp(1, sorted_ns.len()) - 1] as f64 / 1e6
}

/// One measured figure of one repetition.
#[derive(Debug, Clone)]
pub struct Sample {
    pub workload: String,
    pub setup: &'static str,
    pub rep: usize,
    pub metric: String,
    pub value: f64,
}

/// Every sample of the run, in the order measured.
#[derive(Default)]
pub struct Results {
    pub samples: Vec<Sample>,
}

impl Results {
    pub fn add(
        &mut self,
        workload: &str,
        setup: &'static str,
        rep: usize,
        metric: &str,
        value: f64,
    ) {
        println!("    {workload:<10} {setup:<17} rep {rep}: {metric} = {value:.3}");
        self.samples.push(Sample {
            workload: workload.to_string(),
            setup,
            rep,
            metric: metric.to_string(),
            value,
        });
    }

    /// (workload, metric) -> setup -> median over repetitions, in first-measured order.
    pub fn medians(&self) -> Vec<((String, String), BTreeMap<String, f64>)> {
        let mut keys: Vec<(String, String)> = Vec::new();
        for s in &self.samples {
            let k = (s.workload.clone(), s.metric.clone());
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        keys.into_iter()
            .map(|k| {
                let mut by_setup: BTreeMap<String, Vec<f64>> = BTreeMap::new();
                for s in self
                    .samples
                    .iter()
                    .filter(|s| s.workload == k.0 && s.metric == k.1)
                {
                    by_setup
                        .entry(s.setup.to_string())
                        .or_default()
                        .push(s.value);
                }
                let m = by_setup
                    .into_iter()
                    .map(|(setup, v)| (setup, median(&v)))
                    .collect();
                (k, m)
            })
            .collect()
    }
}
