//! The Grafana dashboard: a lint of its JSON, and its queries as Prometheus would receive them
//! from Grafana.
use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// Metrics that may rightly have no series when the checks run, so their queries must parse and
/// run but need not return data. Everything else must. Keep this list short (it is empty: every
/// panel returns data in the end-to-end run) and say why for each entry.
pub const MAY_BE_EMPTY: &[(&str, &str)] = &[];

const DATASOURCE: &str = "${datasource}";

/// One query of one panel.
#[derive(Debug, Clone)]
pub struct Query {
    pub panel_id: u64,
    pub panel: String,
    pub ref_id: String,
    pub expr: String,
    /// Grafana sends it as an instant query (tables) rather than a range query.
    pub instant: bool,
}

impl Query {
    /// The metrics of [`MAY_BE_EMPTY`] this query uses.
    pub fn may_be_empty(&self) -> Vec<&'static str> {
        MAY_BE_EMPTY.iter().map(|(m, _)| *m).filter(|m| uses_metric(&self.expr, m)).collect()
    }
}

/// Whether `expr` names the metric `m` (not just a longer name that starts with it).
fn uses_metric(expr: &str, m: &str) -> bool {
    expr.match_indices(m).any(|(i, _)| {
        let after = expr[i + m.len()..].chars().next();
        let before = expr[..i].chars().last();
        !matches!(after, Some(c) if c.is_alphanumeric() || c == '_')
            && !matches!(before, Some(c) if c.is_alphanumeric() || c == '_')
    })
}

pub struct Dashboard {
    pub json: Value,
}

pub struct Lint {
    pub panels: usize,
    pub queries: Vec<Query>,
}

fn panels(v: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in v["panels"].as_array().map(Vec::as_slice).unwrap_or_default() {
        out.push(p);
        // Collapsed rows keep their panels inside.
        out.extend(panels(p));
    }
    out
}

impl Dashboard {
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let json = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        Ok(Self { json })
    }

    /// Checks what a provisioned, importable dashboard needs; returns its queries. Every problem
    /// is listed, not only the first.
    pub fn lint(&self) -> Result<Lint> {
        let d = &self.json;
        let mut problems = Vec::new();
        let schema = d["schemaVersion"].as_u64().unwrap_or(0);
        if schema < 39 {
            problems.push(format!("schemaVersion is {schema}, want at least 39"));
        }
        for key in ["uid", "title"] {
            if d[key].as_str().is_none_or(str::is_empty) {
                problems.push(format!("no {key}"));
            }
        }
        if !d["id"].is_null() {
            problems.push("id must be null so that importing creates the dashboard".into());
        }
        if d.get("__inputs").is_some() {
            problems.push(
                "__inputs is for manual import only; provisioning needs the datasource variable"
                    .into(),
            );
        }

        let vars = d["templating"]["list"].as_array().cloned().unwrap_or_default();
        let var = |name: &str| vars.iter().find(|v| v["name"] == name);
        match var("datasource") {
            Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
            _ => problems.push("no variable `datasource` of type datasource for prometheus".into()),
        }
        for name in ["job", "instance"] {
            match var(name) {
                Some(v) if v["type"] == "query" && v["datasource"]["uid"] == DATASOURCE => {
                    if name == "instance"
                        && !v["definition"].as_str().unwrap_or("").contains("$job")
                    {
                        problems.push("variable `instance` should be filtered by $job".into());
                    }
                }
                _ => problems.push(format!("no query variable `{name}` on ${{datasource}}")),
            }
        }

        let mut ids = std::collections::HashSet::new();
        let mut queries = Vec::new();
        let mut count = 0;
        for p in panels(d) {
            let id = p["id"].as_u64().unwrap_or(0);
            let title = p["title"].as_str().unwrap_or("").to_string();
            let at = format!("panel {id} '{title}'");
            if !ids.insert(id) {
                problems.push(format!("{at}: duplicate id"));
            }
            if !p["gridPos"].is_object() {
                problems.push(format!("{at}: no gridPos"));
            }
            if p["type"] == "row" {
                continue;
            }
            count += 1;
            if title.is_empty() {
                problems.push(format!("panel {id}: no title"));
            }
            if p["description"].as_str().is_none_or(str::is_empty) {
                problems.push(format!("{at}: no description"));
            }
            if p["fieldConfig"]["defaults"]["unit"].as_str().is_none_or(str::is_empty) {
                problems.push(format!("{at}: no unit (fieldConfig.defaults.unit)"));
            }
            if p["datasource"]["uid"] != DATASOURCE {
                problems.push(format!("{at}: datasource is not ${{datasource}}"));
            }
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            if targets.is_empty() {
                problems.push(format!("{at}: no queries"));
            }
            for t in targets {
                let ref_id = t["refId"].as_str().unwrap_or("?").to_string();
                let at = format!("{at} query {ref_id}");
                if t["datasource"]["uid"] != DATASOURCE {
                    problems.push(format!("{at}: datasource is not ${{datasource}}"));
                }
                let expr = t["expr"].as_str().unwrap_or("").to_string();
                problems.extend(lint_expr(&expr).into_iter().map(|p| format!("{at}: {p}")));
                queries.push(Query {
                    panel_id: id,
                    panel: title.clone(),
                    ref_id,
                    expr,
                    instant: t["instant"] == true,
                });
            }
        }
        if !problems.is_empty() {
            bail!("{} problem(s):\n  {}", problems.len(), problems.join("\n  "));
        }
        Ok(Lint { panels: count, queries })
    }
}

/// Problems of one PromQL expression of the dashboard.
fn lint_expr(expr: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if expr.trim().is_empty() {
        return vec!["empty expression".into()];
    }
    // Every range in a rate()/increase() is $__rate_interval: it follows the scrape interval
    // and the zoom, where a fixed [5m] breaks one or the other.
    for func in ["rate(", "irate(", "increase(", "delta(", "deriv("] {
        for (i, _) in expr.match_indices(func) {
            if expr[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
                continue; // e.g. `irate(` found inside `rate(`
            }
            let rest = &expr[i..];
            let close = matching_paren(rest).unwrap_or(rest.len());
            let inner = &rest[..close];
            if !inner.contains("[$__rate_interval]") {
                problems.push(format!("{func}..) without [$__rate_interval]: {inner})"));
            }
        }
    }
    if expr.replace("[$__rate_interval]", "").contains('[') {
        problems.push("a range other than [$__rate_interval]".into());
    }
    if expr.contains("twmon_") || expr.contains("up{") || expr.contains("scrape_duration_seconds") {
        for sel in [r#"job=~"$job""#, r#"instance=~"$instance""#] {
            if !expr.contains(sel) {
                problems.push(format!("does not filter by {sel}"));
            }
        }
    }
    // Variables other than these would reach Prometheus unreplaced.
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        let name: String =
            rest[i + 1..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        if !["__rate_interval", "job", "instance"].contains(&name.as_str()) {
            problems.push(format!("unknown variable ${name}"));
        }
        rest = &rest[i + 1..];
    }
    problems
}

/// Index of the parenthesis closing the first one in `s`.
fn matching_paren(s: &str) -> Option<usize> {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// The expression as Grafana sends it: `$__rate_interval` at its floor for a 1 s scrape
/// interval and a short time range, and multi-value variables as an escaped regex.
pub fn substitute(expr: &str, job: &str, instance: &str, rate_interval: &str) -> String {
    fn regex_escape(s: &str) -> String {
        let mut out = String::new();
        for c in s.chars() {
            if r"\.+*?()|[]{}^$".contains(c) {
                // One backslash for the regex, doubled inside a PromQL string.
                out.push_str(r"\\");
            }
            out.push(c);
        }
        out
    }
    expr.replace("$__rate_interval", rate_interval)
        .replace("$instance", &regex_escape(instance))
        .replace("$job", &regex_escape(job))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_finds_fixed_ranges_and_missing_filters() {
        let ok = r#"sum(rate(twmon_events_total{job=~"$job", instance=~"$instance"}[$__rate_interval]))"#;
        assert!(lint_expr(ok).is_empty(), "{:?}", lint_expr(ok));
        let fixed = r#"sum(rate(twmon_events_total{job=~"$job", instance=~"$instance"}[5m]))"#;
        let p = lint_expr(fixed);
        assert!(p.iter().any(|p| p.contains("without [$__rate_interval]")), "{p:?}");
        let unfiltered = "sum(twmon_sockets)";
        assert_eq!(lint_expr(unfiltered).len(), 2, "{:?}", lint_expr(unfiltered));
        assert!(
            lint_expr(r#"twmon_sockets{job=~"$job", instance=~"$instance", state="$state"}"#)
                .iter()
                .any(|p| p.contains("$state"))
        );
    }

    #[test]
    fn substitution_escapes_like_grafana() {
        let q = substitute(
            r#"rate(x{job=~"$job", instance=~"$instance"}[$__rate_interval])"#,
            "twmon",
            "127.0.0.1:9864",
            "1m",
        );
        assert_eq!(q, r#"rate(x{job=~"twmon", instance=~"127\\.0\\.0\\.1:9864"}[1m])"#);
    }

    #[test]
    fn metrics_are_matched_by_whole_name() {
        assert!(uses_metric("max(twmon_sysctl{a=\"b\"})", "twmon_sysctl"));
        assert!(!uses_metric("twmon_sockets_total", "twmon_sockets"));
    }

    #[test]
    fn shipped_dashboard_passes_the_lint() {
        let d = Dashboard::load(&crate::root().join("dashboards/twmon.json")).unwrap();
        let lint = d.lint().unwrap();
        assert!(lint.panels >= 20, "{} panels", lint.panels);
    }
}
