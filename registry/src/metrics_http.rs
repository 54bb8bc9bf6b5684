//! The `/metrics` endpoint of the server and client binaries (the
//! controller serves it from its own HTTP view). Libraries never open a
//! port: a binary decides where its metrics are served.
//!
//! prometheus-client encodes OpenMetrics. Prometheus asks for that in its
//! `Accept` header and gets it; every other scraper (and `promtool check
//! metrics`) reads the older Prometheus text format, where a counter's
//! family is named with its `_total` suffix and there is no `# EOF`, so
//! [`negotiate`] converts for them.

use std::sync::Arc;

use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::HeaderMap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The content type of prometheus-client's encoding.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text (as prometheus-client writes it) in the Prometheus text
/// format: counter families renamed to their `_total` samples, `# UNIT` and
/// `# EOF` dropped. Samples are unchanged.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A family's HELP line waits for its TYPE line, which says whether the
    // family is a counter.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, text)) = help.take() {
                push_help(&mut out, name, text);
            }
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            if let Some((_, text)) = help.take() {
                push_help(&mut out, &name, text);
            }
            out.push_str("# TYPE ");
            out.push_str(&name);
            out.push(' ');
            out.push_str(kind);
            out.push('\n');
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if let Some((name, text)) = help {
        push_help(&mut out, name, text);
    }
    out
}

fn push_help(out: &mut String, name: &str, text: &str) {
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    out.push_str(text);
    out.push('\n');
}

/// The body and content type to answer a scrape with, given its `Accept`
/// header: OpenMetrics when asked for, else the Prometheus text format.
pub fn negotiate(headers: &HeaderMap, openmetrics: String) -> (&'static str, String) {
    let wants_openmetrics = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if wants_openmetrics {
        (OPENMETRICS, openmetrics)
    } else {
        (PROMETHEUS_TEXT, to_prometheus_text(&openmetrics))
    }
}

/// Serves `GET /metrics` with whatever `render` returns (OpenMetrics), on
/// `listener`, until `shutdown` is cancelled.
///
/// # Errors
/// The HTTP server failing.
pub async fn serve(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: HeaderMap| {
            let render = render.clone();
            async move {
                let (kind, body) = negotiate(&headers, render());
                ([(CONTENT_TYPE, kind)], body)
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const OM: &str = "# HELP calls Calls made.\n# TYPE calls counter\ncalls_total{a=\"1\"} 3\n\
                      # HELP up Whether up.\n# TYPE up gauge\nup 1\n\
                      # HELP secs Time.\n# TYPE secs histogram\n# UNIT secs seconds\n\
                      secs_sum 1.5\nsecs_count 2\nsecs_bucket{le=\"+Inf\"} 2\n# EOF\n";

    #[test]
    fn counters_are_named_by_their_samples_and_eof_goes() {
        let text = to_prometheus_text(OM);
        assert!(text.starts_with(
            "# HELP calls_total Calls made.\n# TYPE calls_total counter\ncalls_total{a=\"1\"} 3\n"
        ));
        assert!(text.contains("# HELP up Whether up.\n# TYPE up gauge\nup 1\n"));
        assert!(text.contains("# TYPE secs histogram\nsecs_sum 1.5\n"));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
    }

    #[test]
    fn prometheus_gets_openmetrics_others_get_text() {
        let mut h = HeaderMap::new();
        assert_eq!(negotiate(&h, OM.into()).0, PROMETHEUS_TEXT);
        h.insert(
            ACCEPT,
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
                .parse()
                .unwrap(),
        );
        let (kind, body) = negotiate(&h, OM.into());
        assert_eq!((kind, body.as_str()), (OPENMETRICS, OM));
    }
}
