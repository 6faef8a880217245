//! The Prometheus text exposition format, parsed for assertions: a missing series is `None`
//! (or NaN, which fails every comparison), never 0.
use std::collections::HashMap;

/// One sample: a metric name, its labels sorted by name, and its value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Labels,
    value: f64,
}

/// A parsed scrape.
#[derive(Debug, Clone)]
pub struct Metrics {
    samples: Vec<Sample>,
    /// `name{k="v",...}` (labels sorted, values as the text escapes them) -> index in `samples`.
    index: HashMap<String, usize>,
    pub text: String,
}

/// The text form of a label set: `k="v",...` in the given order, values escaped.
fn label_text(labels: &[(impl AsRef<str>, impl AsRef<str>)]) -> String {
    let escape = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    labels
        .iter()
        .map(|(k, v)| format!("{}=\"{}\"", k.as_ref(), escape(v.as_ref())))
        .collect::<Vec<_>>()
        .join(",")
}

/// Label pairs, unescaped.
type Labels = Vec<(String, String)>;

/// `k="v",...` up to the closing brace: the pairs, unescaped, and what follows the brace.
fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    let mut rest = s.trim_start();
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (key, after) = rest.split_once("=\"").ok_or("a label without =\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().ok_or("a label value without its closing quote")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("an escape at the end")?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_string(), value));
        rest = &after[end + 1..];
    }
}

impl Metrics {
    /// Parses a scrape; a line that is not a comment, a blank or a sample is an error.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let bad = |why: &str| format!("{why} in the sample line {line:?}");
            let (name, labels, rest) = match line.split_once('{') {
                Some((name, rest)) => {
                    let (mut labels, rest) = parse_labels(rest).map_err(|e| bad(&e))?;
                    labels.sort();
                    (name, labels, rest)
                }
                None => {
                    let (name, rest) = line.split_once(' ').ok_or_else(|| bad("no value"))?;
                    (name, Vec::new(), rest)
                }
            };
            // The value, then an optional timestamp.
            let value = rest.split_whitespace().next().ok_or_else(|| bad("no value"))?;
            let value = value.parse::<f64>().map_err(|e| bad(&format!("value {value:?}: {e}")))?;
            samples.push(Sample { name: name.trim().to_string(), labels, value });
        }
        let index = samples
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("{}{{{}}}", s.name, label_text(&s.labels)), i))
            .collect();
        Ok(Self { samples, index, text: text.to_string() })
    }

    /// The value of the series with exactly these labels; `None` when it does not exist.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut labels = labels.to_vec();
        labels.sort();
        self.index
            .get(&format!("{name}{{{}}}", label_text(&labels)))
            .map(|&i| self.samples[i].value)
    }

    /// As [`Metrics::value`], NaN when the series does not exist, so that a missing series fails
    /// every comparison and a wait for a value keeps waiting.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(f64::NAN)
    }

    /// The sum of the series of `name` that have all of `labels` (and any others); `None` when
    /// there is none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let has = |s: &Sample| {
            labels.iter().all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        };
        self.samples
            .iter()
            .filter(|s| s.name == name && has(s))
            .map(|s| s.value)
            .reduce(|a, b| a + b)
    }

    /// Every series of `name`: (labels as `k="v"` sorted and comma-joined, value), sorted.
    pub fn series(&self, name: &str) -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| (label_text(&s.labels), s.value))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Whether `name` has any series.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    /// How many samples the scrape had.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The series of `family` that changed since `before`, as `{labels} +delta`.
    pub fn changed(&self, before: &Metrics, family: &str) -> Vec<String> {
        self.samples
            .iter()
            .filter(|s| s.name == family)
            .filter_map(|s| {
                let labels: Vec<(&str, &str)> =
                    s.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let delta = s.value - before.value(family, &labels).unwrap_or(0.0);
                (delta != 0.0).then(|| format!("{{{}}} +{delta}", label_text(&s.labels)))
            })
            .collect()
    }

    /// `twmon_sockets` in a state.
    pub fn sockets(&self, state: &str) -> f64 {
        self.get("twmon_sockets", &[("state", state)])
    }

    pub fn transitions(&self, from: &str, to: &str) -> f64 {
        self.get("twmon_state_transitions_total", &[("from", from), ("to", to)])
    }

    pub fn duration_count(&self, state: &str) -> f64 {
        self.get("twmon_state_duration_seconds_count", &[("state", state)])
    }

    pub fn duration_sum(&self, state: &str) -> f64 {
        self.get("twmon_state_duration_seconds_sum", &[("state", state)])
    }

    pub fn bucket(&self, state: &str, le: &str) -> f64 {
        self.get("twmon_state_duration_seconds_bucket", &[("state", state), ("le", le)])
    }

    /// What a failed comparison needs to be understood, for its message: every non-zero
    /// twmon series but histogram buckets, program run statistics and sysctls.
    pub fn explain(&self) -> String {
        self.text
            .lines()
            .filter(|l| {
                l.starts_with("twmon_")
                    && !l.contains("_bucket")
                    && !l.contains("bpf_program_run")
                    && !l.contains("sysctl")
                    && !l.ends_with(" 0")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every `twmon_state_transitions_total` series with a non-zero value, for messages.
    pub fn all_transitions(&self) -> Vec<(String, f64)> {
        self.series("twmon_state_transitions_total")
            .into_iter()
            .filter(|(_, v)| *v != 0.0)
            .map(|(l, v)| (format!("twmon_state_transitions_total{{{l}}}"), v))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP a_total A.\n# TYPE a_total counter\na_total{to=\"x\",from=\"y\"} 3\n\
                        a_total{from=\"z\",to=\"x\"} 4 1700000000000\nplain 1.5\n\
                        quoted{v=\"a \\\"b\\\", c\\\\d\"} 2\n";

    #[test]
    fn samples_are_found_by_their_label_set() {
        let m = Metrics::parse(TEXT).unwrap();
        assert_eq!(m.value("a_total", &[("from", "y"), ("to", "x")]), Some(3.0));
        assert_eq!(m.value("a_total", &[("to", "x"), ("from", "z")]), Some(4.0));
        assert_eq!(m.value("a_total", &[("to", "x")]), None, "a subset is another series");
        assert!(m.get("a_total", &[("from", "w"), ("to", "x")]).is_nan());
        assert_eq!(m.value("plain", &[]), Some(1.5));
        assert_eq!(m.value("quoted", &[("v", "a \"b\", c\\d")]), Some(2.0));
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn a_sum_of_nothing_is_none() {
        let m = Metrics::parse(TEXT).unwrap();
        assert_eq!(m.sum("a_total", &[("to", "x")]), Some(7.0));
        assert_eq!(m.sum("a_total", &[("to", "q")]), None);
        assert_eq!(m.series("a_total")[0], ("from=\"y\",to=\"x\"".to_string(), 3.0));
    }

    #[test]
    fn bad_lines_are_errors() {
        assert!(Metrics::parse("a{b=\"c} 1\n").is_err());
        assert!(Metrics::parse("a 1x\n").is_err());
        assert!(Metrics::parse("a\n").is_err());
    }
}
