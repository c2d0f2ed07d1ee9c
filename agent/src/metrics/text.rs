//! The Prometheus text format (0.0.4) for clients that do not ask for
//! OpenMetrics (curl, `promtool check metrics`, older scrapers), derived
//! from the OpenMetrics text prometheus-client writes. The two differ only
//! in a few places: OpenMetrics names a counter family without its `_total`
//! suffix and has `# UNIT` and `# EOF` lines.

/// `Content-Type` of [`to_prometheus_text`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Does an `Accept` header ask for OpenMetrics?
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// Rewrites OpenMetrics text (as prometheus-client writes it: `# HELP`
/// before `# TYPE`, no exemplars, no `_created`) as Prometheus text.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some(h) = help.replace(rest) {
                push_help(&mut out, h, "");
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let suffix = if kind == "counter" && !name.ends_with("_total") {
                "_total"
            } else {
                ""
            };
            if let Some(h) = help.take() {
                push_help(&mut out, h, suffix);
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
            continue;
        }
        if let Some(h) = help.take() {
            push_help(&mut out, h, "");
        }
        out.push_str(line);
        out.push('\n');
    }
    if let Some(h) = help {
        push_help(&mut out, h, "");
    }
    out
}

fn push_help(out: &mut String, help: &str, suffix: &str) {
    let (name, text) = help.split_once(' ').unwrap_or((help, ""));
    out.push_str(&format!("# HELP {name}{suffix} {text}\n"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_their_total_family_name_and_openmetrics_lines_go() {
        let om = "# HELP a_drops Drops.\n# TYPE a_drops counter\na_drops_total{x=\"1\"} 3\n\
                  # HELP a_apply_seconds Latency.\n# TYPE a_apply_seconds histogram\n\
                  # UNIT a_apply_seconds seconds\na_apply_seconds_sum 0.0\n\
                  # HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_drops_total Drops.\n# TYPE a_drops_total counter\na_drops_total{x=\"1\"} 3\n\
             # HELP a_apply_seconds Latency.\n# TYPE a_apply_seconds histogram\n\
             a_apply_seconds_sum 0.0\n\
             # HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n"
        );
    }

    #[test]
    fn openmetrics_only_when_asked() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(None));
    }
}
