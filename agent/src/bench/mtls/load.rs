//! The load generators of the mTLS bench, run in the client pod, and what
//! their output says: iperf3 (throughput, from its JSON) and wrk (requests
//! per second and latency percentiles, from its text report).

use std::time::Duration;

use super::inpod::{InPod, InPodError};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Place(#[from] InPodError),
    #[error("running {tool} in {pod} (cargo xtask setup installs it)")]
    Spawn {
        tool: &'static str,
        pod: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} in {pod} failed ({status}): {stderr}")]
    Failed {
        tool: &'static str,
        pod: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{tool}: cannot read its report ({why}): {report}")]
    Unreadable {
        tool: &'static str,
        why: &'static str,
        report: String,
    },
}

/// What one iperf3 run moved, as the receiving side counted it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Throughput {
    pub bytes: u64,
    pub seconds: f64,
}

impl Throughput {
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.seconds.max(1e-9) / 1e9
    }
}

/// What one wrk run answered.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Requests {
    pub requests: u64,
    pub per_second: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// Socket errors and non-2xx/3xx answers.
    pub errors: u64,
}

async fn run(pod: &InPod, tool: &'static str, args: &[String]) -> Result<String, LoadError> {
    let out = pod
        .command(tool)?
        .args(args)
        .output()
        .await
        .map_err(|source| LoadError::Spawn {
            tool,
            pod: pod.pod.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(LoadError::Failed {
            tool,
            pod: pod.pod.clone(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr)
                .chars()
                .take(2000)
                .collect(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `streams` parallel TCP streams from the pod to `host:port` for `seconds`.
pub async fn iperf3(
    pod: &InPod,
    host: &str,
    port: u16,
    streams: u32,
    seconds: u32,
) -> Result<Throughput, LoadError> {
    let args = [
        "-c",
        host,
        "-p",
        &port.to_string(),
        "-P",
        &streams.to_string(),
        "-t",
        &seconds.to_string(),
        "-J",
    ]
    .map(String::from);
    parse_iperf3(&run(pod, "iperf3", &args).await?)
}

fn parse_iperf3(report: &str) -> Result<Throughput, LoadError> {
    let unreadable = |why| LoadError::Unreadable {
        tool: "iperf3",
        why,
        report: report.chars().take(2000).collect(),
    };
    let json: serde_json::Value = serde_json::from_str(report).map_err(|_| unreadable("JSON"))?;
    let sum = &json["end"]["sum_received"];
    let bytes = sum["bytes"].as_u64().ok_or_else(|| unreadable("bytes"))?;
    let seconds = sum["seconds"]
        .as_f64()
        .ok_or_else(|| unreadable("seconds"))?;
    Ok(Throughput { bytes, seconds })
}

/// HTTP GETs of `url` from the pod for `seconds`, over `connections`
/// connections, each kept alive or (`close`) one per request.
pub async fn wrk(
    pod: &InPod,
    url: &str,
    connections: u32,
    seconds: u32,
    close: bool,
) -> Result<Requests, LoadError> {
    let mut args: Vec<String> = [
        "-t1",
        &format!("-c{connections}"),
        &format!("-d{seconds}s"),
        "--latency",
    ]
    .map(String::from)
    .to_vec();
    if close {
        args.extend(["-H".into(), "Connection: close".into()]);
    }
    args.push(url.into());
    parse_wrk(&run(pod, "wrk", &args).await?)
}

fn parse_wrk(report: &str) -> Result<Requests, LoadError> {
    let unreadable = |why| LoadError::Unreadable {
        tool: "wrk",
        why,
        report: report.chars().take(2000).collect(),
    };
    let mut r = Requests::default();
    let (mut p50, mut p99, mut rate, mut count) = (None, None, None, None);
    for line in report.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", t] => p50 = parse_time(t),
            ["99%", t] => p99 = parse_time(t),
            ["Requests/sec:", n] => rate = n.parse().ok(),
            [n, "requests", "in", ..] => count = n.parse().ok(),
            ["Socket", "errors:", rest @ ..] => {
                r.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse().unwrap_or(0),
            _ => {}
        }
    }
    r.p50 = p50.ok_or_else(|| unreadable("no 50% latency"))?;
    r.p99 = p99.ok_or_else(|| unreadable("no 99% latency"))?;
    r.per_second = rate.ok_or_else(|| unreadable("no Requests/sec"))?;
    r.requests = count.ok_or_else(|| unreadable("no request count"))?;
    Ok(r)
}

/// wrk's times: `216.00us`, `1.20ms`, `2.01s`, `1.00m`.
fn parse_time(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let n: f64 = number.parse().ok()?;
    let scale = match unit {
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(n * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_reports_are_read() {
        let report = "Running 1s test @ http://198.18.1.11:8080/\n\
              1 threads and 16 connections\n\
              Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
                Latency   250.12us  100.00us   2.00ms   90.00%\n\
              Latency Distribution\n\
                 50%  216.00us\n\
                 75%  265.00us\n\
                 90%  329.00us\n\
                 99%    1.20ms\n\
              62874 requests in 1.00s, 15.29MB read\n\
              Socket errors: connect 0, read 2, write 0, timeout 1\n\
              Non-2xx or 3xx responses: 5\n\
            Requests/sec:  62253.97\n\
            Transfer/sec:     15.14MB\n";
        let r = parse_wrk(report).unwrap();
        assert_eq!(r.requests, 62874);
        assert!((r.per_second - 62253.97).abs() < 1e-6);
        assert_eq!(r.p50, Duration::from_micros(216));
        assert_eq!(r.p99, Duration::from_micros(1200));
        assert_eq!(r.errors, 8);
        assert!(parse_wrk("Running 1s test\n").is_err());
    }

    #[test]
    fn iperf3_json_is_read() {
        let t = parse_iperf3(
            r#"{"start": {}, "end": {"sum_received": {"bytes": 1250000000, "seconds": 2.0}}}"#,
        )
        .unwrap();
        assert!((t.gbit_per_s() - 5.0).abs() < 1e-9);
        assert!(parse_iperf3(r#"{"error": "unable to connect"}"#).is_err());
    }
}
