//! Metric families built at scrape time from a source read then (const metrics, as
//! node_exporter's and ebpf_exporter's collectors emit them): no series kept in step by hand,
//! and a scrape never sees a family half rebuilt.
use prometheus::{
    core::Desc,
    proto::{self, MetricFamily, MetricType},
};

/// A family's name, help, type and label names: its `Desc` for the registry, and the family
/// that each scrape fills.
pub struct Spec {
    pub desc: Desc,
    kind: MetricType,
    labels: &'static [&'static str],
}

impl Spec {
    pub fn counter(
        name: &str,
        help: &str,
        labels: &'static [&'static str],
    ) -> prometheus::Result<Self> {
        Self::new(name, help, MetricType::COUNTER, labels)
    }

    pub fn gauge(
        name: &str,
        help: &str,
        labels: &'static [&'static str],
    ) -> prometheus::Result<Self> {
        Self::new(name, help, MetricType::GAUGE, labels)
    }

    pub fn histogram(
        name: &str,
        help: &str,
        labels: &'static [&'static str],
    ) -> prometheus::Result<Self> {
        Self::new(name, help, MetricType::HISTOGRAM, labels)
    }

    fn new(
        name: &str,
        help: &str,
        kind: MetricType,
        labels: &'static [&'static str],
    ) -> prometheus::Result<Self> {
        let variable = labels.iter().map(|l| l.to_string()).collect();
        Ok(Self {
            desc: Desc::new(name.into(), help.into(), variable, Default::default())?,
            kind,
            labels,
        })
    }

    /// An empty family of this spec, to add samples to.
    pub fn family(&self) -> Family<'_> {
        Family { spec: self, metrics: Vec::new() }
    }
}

pub struct Family<'a> {
    spec: &'a Spec,
    metrics: Vec<proto::Metric>,
}

impl Family<'_> {
    /// A sample with `values` for the spec's labels, in their order.
    pub fn add(&mut self, values: &[&str], value: f64) {
        let mut m = self.metric(values);
        match self.spec.kind {
            MetricType::COUNTER => {
                let mut c = proto::Counter::default();
                c.set_value(value);
                m.set_counter(c);
            }
            _ => {
                let mut g = proto::Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            }
        }
        self.metrics.push(m);
    }

    /// A histogram sample: cumulative buckets `(upper bound, count)`, count and sum.
    pub fn add_histogram(
        &mut self,
        values: &[&str],
        buckets: Vec<proto::Bucket>,
        count: u64,
        sum: f64,
    ) {
        let mut h = proto::Histogram::default();
        h.set_sample_count(count);
        h.set_sample_sum(sum);
        h.set_bucket(buckets);
        let mut m = self.metric(values);
        m.set_histogram(h);
        self.metrics.push(m);
    }

    fn metric(&self, values: &[&str]) -> proto::Metric {
        debug_assert_eq!(values.len(), self.spec.labels.len(), "{}", self.spec.desc.fq_name);
        let labels = self
            .spec
            .labels
            .iter()
            .zip(values)
            .map(|(name, value)| {
                let mut l = proto::LabelPair::default();
                l.set_name(name.to_string());
                l.set_value(value.to_string());
                l
            })
            .collect();
        proto::Metric::from_label(labels)
    }

    /// The family, or nothing when it has no samples (as the text format would show it).
    pub fn done(self, out: &mut Vec<MetricFamily>) {
        if self.metrics.is_empty() {
            return;
        }
        let mut mf = MetricFamily::default();
        mf.set_name(self.spec.desc.fq_name.clone());
        mf.set_help(self.spec.desc.help.clone());
        mf.set_field_type(self.spec.kind);
        mf.set_metric(self.metrics);
        out.push(mf);
    }
}

/// A collector the agent keeps a handle on, as registered: the registry owns its box, the
/// agent writes what it reads (or reads it too, as the JSON snapshot does).
pub struct Shared<C>(pub std::sync::Arc<C>);

impl<C: prometheus::core::Collector> prometheus::core::Collector for Shared<C> {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}
