//! The TCP counters that tell a connection-rate round measured policy and
//! not a full accept queue: SYN retransmissions (the client waited out a 1 s
//! timeout) and listen queue overflows and drops (the server's kernel threw
//! a SYN away). Read from `/proc/<pid>/net/{netstat,snmp}` of a pod's
//! process, which are its network namespace's, as `nstat` reads them.

use std::{collections::HashMap, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TcpStatError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no {prefix} {field} counter")]
    Missing {
        path: PathBuf,
        prefix: &'static str,
        field: &'static str,
    },
}

/// The counters of one network namespace at one moment (or the difference
/// between two moments).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// TcpExt TCPSynRetrans: SYNs sent again after no answer.
    pub syn_retrans: u64,
    /// Tcp RetransSegs: every retransmitted segment.
    pub retrans_segs: u64,
    /// TcpExt ListenOverflows: SYNs dropped for a full accept queue.
    pub listen_overflows: u64,
    /// TcpExt ListenDrops: SYNs a listener dropped for any reason.
    pub listen_drops: u64,
}

impl TcpCounters {
    /// What happened between `self` (earlier) and `later`.
    pub fn until(&self, later: &TcpCounters) -> TcpCounters {
        TcpCounters {
            syn_retrans: later.syn_retrans.saturating_sub(self.syn_retrans),
            retrans_segs: later.retrans_segs.saturating_sub(self.retrans_segs),
            listen_overflows: later.listen_overflows.saturating_sub(self.listen_overflows),
            listen_drops: later.listen_drops.saturating_sub(self.listen_drops),
        }
    }

    /// Whether a SYN was lost or dropped: a connect loop then stalled for a
    /// retransmission timeout, and the round says nothing about policy.
    pub fn stalled(&self) -> bool {
        self.syn_retrans > 0 || self.listen_overflows > 0 || self.listen_drops > 0
    }
}

/// The counters of the network namespace `pid` lives in.
pub fn read(pid: u32) -> Result<TcpCounters, TcpStatError> {
    let dir = PathBuf::from(format!("/proc/{pid}/net"));
    let netstat = dir.join("netstat");
    let snmp = dir.join("snmp");
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).map_err(|source| TcpStatError::Read {
            path: path.clone(),
            source,
        })
    };
    let ext = parse_table(&read(&netstat)?, "TcpExt");
    let tcp = parse_table(&read(&snmp)?, "Tcp");
    let get = |table: &HashMap<String, u64>, path: &PathBuf, prefix, field| {
        table.get(field).copied().ok_or(TcpStatError::Missing {
            path: path.clone(),
            prefix,
            field,
        })
    };
    Ok(TcpCounters {
        syn_retrans: get(&ext, &netstat, "TcpExt", "TCPSynRetrans")?,
        listen_overflows: get(&ext, &netstat, "TcpExt", "ListenOverflows")?,
        listen_drops: get(&ext, &netstat, "TcpExt", "ListenDrops")?,
        retrans_segs: get(&tcp, &snmp, "Tcp", "RetransSegs")?,
    })
}

/// The `prefix:` table of a /proc/net/{netstat,snmp} file: a line of names
/// followed by a line of values, both starting with `prefix:`.
fn parse_table(text: &str, prefix: &str) -> HashMap<String, u64> {
    let tag = format!("{prefix}:");
    let mut lines = text.lines().filter_map(|l| l.strip_prefix(tag.as_str()));
    let mut out = HashMap::new();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
            // Tcp MaxConn is -1; the counters we read are never negative.
            if let Ok(v) = value.parse() {
                out.insert(name.to_string(), v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETSTAT: &str = "\
TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops TCPSynRetrans
TcpExt: 0 0 12 14 3
IpExt: InNoRoutes InTruncatedPkts
IpExt: 0 0
";
    const SNMP: &str = "\
Ip: Forwarding DefaultTTL
Ip: 1 64
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens RetransSegs
Tcp: 1 200 120000 -1 5000 7
Udp: InDatagrams
Udp: 3
";

    #[test]
    fn tables_pair_names_with_values_and_skip_other_prefixes() {
        let ext = parse_table(NETSTAT, "TcpExt");
        assert_eq!(ext["ListenOverflows"], 12);
        assert_eq!(ext["ListenDrops"], 14);
        assert_eq!(ext["TCPSynRetrans"], 3);
        assert!(!ext.contains_key("InNoRoutes"));
        let tcp = parse_table(SNMP, "Tcp");
        assert_eq!(tcp["RetransSegs"], 7);
        assert_eq!(tcp["ActiveOpens"], 5000);
        // "Tcp:" is not confused with "TcpExt:", nor MaxConn's -1 kept.
        assert!(!tcp.contains_key("MaxConn"));
        assert!(parse_table(NETSTAT, "Tcp").is_empty());
    }

    #[test]
    fn deltas_and_the_stall_rule() {
        let before = TcpCounters {
            syn_retrans: 3,
            retrans_segs: 7,
            listen_overflows: 12,
            listen_drops: 14,
        };
        assert_eq!(before.until(&before), TcpCounters::default());
        assert!(!before.until(&before).stalled());
        let one_syn = TcpCounters {
            syn_retrans: 4,
            retrans_segs: 8,
            ..before
        };
        let d = before.until(&one_syn);
        assert_eq!((d.syn_retrans, d.retrans_segs), (1, 1));
        assert!(d.stalled());
        let dropped = TcpCounters {
            listen_drops: 15,
            ..before
        };
        assert!(before.until(&dropped).stalled());
        let overflow = TcpCounters {
            listen_overflows: 13,
            ..before
        };
        assert!(before.until(&overflow).stalled());
        // A data retransmission alone does not stall a connect loop.
        let data = TcpCounters {
            retrans_segs: 9,
            ..before
        };
        assert!(!before.until(&data).stalled());
    }

    #[test]
    fn this_processs_own_namespace_has_the_counters() {
        let c = read(std::process::id()).unwrap();
        let again = read(std::process::id()).unwrap();
        assert!(again.syn_retrans >= c.syn_retrans);
        let e = read(u32::MAX).unwrap_err();
        assert!(
            e.to_string().contains("/proc/4294967295/net/netstat"),
            "{e}"
        );
    }
}
