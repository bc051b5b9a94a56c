//! `GET /metrics`: the Prometheus text exposition format (version 0.0.4)
//! on the API listener.
//!
//! Built from the same status document as `enilab status` (so the two never
//! disagree) plus the daemon's own API request counters:
//!
//! * per ENI: `enilab_eni_{rx,tx}_{packets,bytes}_total`,
//!   `enilab_eni_new_flows_total`, `enilab_eni_drops_total{reason=…}`, the
//!   ENA-named `enilab_eni_{pps,bw_in,bw_out,linklocal,conntrack}_allowance_exceeded_total`,
//!   `enilab_eni_conntrack_tracked` and `enilab_eni_conntrack_allowance_available`;
//! * per network card (worker group): `enilab_card_{forwarded,dropped,wakeups}_total`;
//! * per (instance, network card) aggregate:
//!   `enilab_card_{pps,bw_in,bw_out}_allowance_exceeded_total{instance=…,card=…}`;
//! * per hyperplane node: flows, own flows, replication lag, port
//!   allocation failures, `enilab_hyperplane_drops_total{reason=…}`;
//! * `enilab_api_requests_total{action=…,code=…}`.
//!
//! Every family has `# HELP` and `# TYPE`; label values are escaped as the
//! format asks (`\\`, `\"`, `\n`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use serde_json::Value;

/// Where the daemon serves it.
pub const PATH: &str = "/metrics";

/// The content type Prometheus expects for the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Distinct (action, code) pairs kept; the rest are counted as
/// `action="other"` so a client sending random actions cannot grow the map.
const MAX_ACTION_SERIES: usize = 512;

/// Longest action name kept as a label value.
const MAX_ACTION_LEN: usize = 64;

/// API requests by (action, HTTP status).
static REQUESTS: Mutex<BTreeMap<(String, u16), u64>> = Mutex::new(BTreeMap::new());

/// Count one API request. `action` is the `Action` parameter as sent
/// (None when missing or the request could not be decoded).
pub fn count_request(action: Option<&str>, status: u16) {
    let action = match action {
        Some(a)
            if !a.is_empty()
                && a.len() <= MAX_ACTION_LEN
                && a.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            a
        }
        Some(_) => "other",
        None => "none",
    };
    let mut m = REQUESTS.lock().unwrap_or_else(|p| p.into_inner());
    let key = (action.to_string(), status);
    if !m.contains_key(&key) && m.len() >= MAX_ACTION_SERIES {
        *m.entry(("other".to_string(), status)).or_insert(0) += 1;
        return;
    }
    *m.entry(key).or_insert(0) += 1;
}

fn requests_snapshot() -> Vec<((String, u16), u64)> {
    let m = REQUESTS.lock().unwrap_or_else(|p| p.into_inner());
    m.iter().map(|(k, v)| (k.clone(), *v)).collect()
}

/// Escape a label value: backslash, double quote and line feed.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Escape HELP text: backslash and line feed.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Metric kind, as `# TYPE` names it.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// One metric family being written: its samples must be contiguous.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

impl Family {
    fn new(name: &'static str, kind: Kind, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    fn add(&mut self, labels: Vec<(&'static str, String)>, value: f64) {
        self.samples.push((labels, value));
    }

    fn write(&self, out: &mut String) {
        let kind = match self.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# HELP {} {}", self.name, escape_help(self.help));
        let _ = writeln!(out, "# TYPE {} {kind}", self.name);
        for (labels, value) in &self.samples {
            out.push_str(self.name);
            if !labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{k}=\"{}\"", escape_label(v));
                }
                out.push('}');
            }
            let _ = writeln!(out, " {}", format_value(*value));
        }
    }
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn num(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().unwrap_or(0.0),
        Value::Bool(b) => f64::from(u8::from(*b)),
        _ => 0.0,
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// The exposition for a status document (as [`super::status::collect`]
/// builds it) and the request counters.
pub fn render(status: &Value) -> String {
    let mut fams: Vec<Family> = Vec::new();
    let driver = &status["driver"];

    // Resources as the state has them.
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
    for i in arr(&status["instances"]) {
        *by_state.entry(text(&i["state"])).or_insert(0) += 1;
    }
    let mut f = Family::new(
        "enilab_instances",
        Kind::Gauge,
        "Instances in the state, by instance state.",
    );
    for (s, n) in by_state {
        f.add(vec![("state", s)], n as f64);
    }
    fams.push(f);
    let mut f = Family::new(
        "enilab_network_interfaces",
        Kind::Gauge,
        "Network interfaces in the state.",
    );
    f.add(vec![], arr(&status["enis"]).len() as f64);
    fams.push(f);

    // Per ENI, from the switch port counters.
    const ENI: [(&str, &str, &str); 12] = [
        (
            "enilab_eni_rx_packets_total",
            "rx_packets",
            "Frames delivered toward the guest.",
        ),
        (
            "enilab_eni_rx_bytes_total",
            "rx_bytes",
            "Bytes delivered toward the guest.",
        ),
        (
            "enilab_eni_tx_packets_total",
            "tx_packets",
            "Frames the guest transmitted into the switch.",
        ),
        (
            "enilab_eni_tx_bytes_total",
            "tx_bytes",
            "Bytes the guest transmitted into the switch.",
        ),
        (
            "enilab_eni_new_flows_total",
            "new_flows",
            "Flows connection tracking admitted for this interface.",
        ),
        (
            "enilab_eni_arp_replies_total",
            "arp_replies",
            "ARP replies the switch sent to this interface.",
        ),
        (
            "enilab_eni_dhcp_replies_total",
            "dhcp_replies",
            "DHCP replies the switch sent to this interface.",
        ),
        (
            "enilab_eni_pps_allowance_exceeded_total",
            "pps_allowance_exceeded",
            "Frames dropped over the interface's packets-per-second allowance.",
        ),
        (
            "enilab_eni_bw_in_allowance_exceeded_total",
            "bw_in_allowance_exceeded",
            "Frames toward the interface dropped over its inbound bandwidth allowance.",
        ),
        (
            "enilab_eni_bw_out_allowance_exceeded_total",
            "bw_out_allowance_exceeded",
            "Frames from the interface dropped over its outbound bandwidth allowance.",
        ),
        (
            "enilab_eni_linklocal_allowance_exceeded_total",
            "linklocal_allowance_exceeded",
            "Frames to link-local services dropped over the interface's allowance.",
        ),
        (
            "enilab_eni_conntrack_allowance_exceeded_total",
            "conntrack_allowance_exceeded",
            "New flows dropped because the interface tracked its allowance of connections.",
        ),
    ];
    let devices = arr(&driver["devices"]);
    let eni_labels = |d: &Value| {
        vec![
            ("eni", text(&d["eni"])),
            ("instance", text(&d["instance"])),
            ("card", text(&d["card"])),
        ]
    };
    for (name, key, help) in ENI {
        let mut f = Family::new(name, Kind::Counter, help);
        for d in devices {
            f.add(eni_labels(d), num(&d["stats"][key]));
        }
        fams.push(f);
    }
    let mut f = Family::new(
        "enilab_eni_conntrack_tracked",
        Kind::Gauge,
        "Connections charged to the interface's conntrack allowance (flows it opened, and flows to it from ends without one; expired ones until swept).",
    );
    for d in devices {
        f.add(eni_labels(d), num(&d["stats"]["conntrack_tracked"]));
    }
    fams.push(f);
    let mut f = Family::new(
        "enilab_eni_conntrack_allowance_available",
        Kind::Gauge,
        "Connections the interface may still track (interfaces with an allowance).",
    );
    for d in devices {
        let v = &d["stats"]["conntrack_allowance_available"];
        if !v.is_null() {
            f.add(eni_labels(d), num(v));
        }
    }
    fams.push(f);
    let mut f = Family::new(
        "enilab_eni_drops_total",
        Kind::Counter,
        "Frames dropped on this interface, by reason.",
    );
    for d in devices {
        if let Some(drops) = d["stats"]["drops"].as_object() {
            for (reason, n) in drops {
                let mut l = eni_labels(d);
                l.push(("reason", reason.clone()));
                f.add(l, num(n));
            }
        }
    }
    fams.push(f);

    // Per network card (a group of worker threads).
    const CARD: [(&str, &str, Kind, &str); 4] = [
        (
            "enilab_card_workers",
            "workers",
            Kind::Gauge,
            "Worker threads serving the card.",
        ),
        (
            "enilab_card_forwarded_total",
            "forwarded",
            Kind::Counter,
            "Frames the card's workers forwarded.",
        ),
        (
            "enilab_card_dropped_total",
            "dropped",
            Kind::Counter,
            "Frames the card's workers dropped.",
        ),
        (
            "enilab_card_wakeups_total",
            "wakeups",
            Kind::Counter,
            "Times the card's workers woke up.",
        ),
    ];
    let cards = arr(&driver["cards"]);
    for (name, key, kind, help) in CARD {
        let mut f = Family::new(name, kind, help);
        for c in cards {
            f.add(vec![("card", text(&c["card"]))], num(&c[key]));
        }
        fams.push(f);
    }

    // Per (instance, network card) aggregate allowance.
    const CARD_ALLOWANCE: [(&str, &str, &str); 3] = [
        (
            "enilab_card_pps_allowance_exceeded_total",
            "pps_allowance_exceeded",
            "Frames dropped over the packets-per-second allowance an instance's interfaces on one card share.",
        ),
        (
            "enilab_card_bw_in_allowance_exceeded_total",
            "bw_in_allowance_exceeded",
            "Frames dropped over the inbound bandwidth an instance's interfaces on one card share.",
        ),
        (
            "enilab_card_bw_out_allowance_exceeded_total",
            "bw_out_allowance_exceeded",
            "Frames dropped over the outbound bandwidth an instance's interfaces on one card share.",
        ),
    ];
    let aggregates = arr(&status["card_allowances"]);
    for (name, key, help) in CARD_ALLOWANCE {
        let mut f = Family::new(name, Kind::Counter, help);
        for c in aggregates {
            f.add(
                vec![
                    ("instance", text(&c["instance"])),
                    ("card", text(&c["card"])),
                ],
                num(&c[key]),
            );
        }
        fams.push(f);
    }

    // Per hyperplane node.
    const NODE: [(&str, &str, Kind, &str); 8] = [
        (
            "enilab_hyperplane_node_running",
            "running",
            Kind::Gauge,
            "1 when the node's thread runs.",
        ),
        (
            "enilab_hyperplane_flows",
            "flows",
            Kind::Gauge,
            "Flows in the node's table (own and replicated).",
        ),
        (
            "enilab_hyperplane_own_flows",
            "own_flows",
            Kind::Gauge,
            "Flows this node is primary for.",
        ),
        (
            "enilab_hyperplane_replication_lag",
            "replication_lag",
            Kind::Gauge,
            "Replication records sent to the node and not applied yet.",
        ),
        (
            "enilab_hyperplane_port_allocation_failures_total",
            "port_allocation_failures",
            Kind::Counter,
            "NAT port allocations that failed (ErrorPortAllocation).",
        ),
        (
            "enilab_hyperplane_frames_in_total",
            "frames_in",
            Kind::Counter,
            "Frames the node received.",
        ),
        (
            "enilab_hyperplane_frames_out_total",
            "frames_out",
            Kind::Counter,
            "Frames the node sent.",
        ),
        (
            "enilab_hyperplane_table_bytes",
            "table_bytes",
            Kind::Gauge,
            "Bytes held by the node's flow table.",
        ),
    ];
    let nodes = arr(&driver["hyperplane"]["nodes"]);
    for (name, key, kind, help) in NODE {
        let mut f = Family::new(name, kind, help);
        for n in nodes {
            f.add(vec![("node", text(&n["node"]))], num(&n[key]));
        }
        fams.push(f);
    }
    let mut f = Family::new(
        "enilab_hyperplane_drops_total",
        Kind::Counter,
        "Frames the node dropped, by reason (reasons seen so far).",
    );
    for n in nodes {
        if let Some(drops) = n["drops"].as_object() {
            for (reason, c) in drops {
                f.add(
                    vec![("node", text(&n["node"])), ("reason", reason.clone())],
                    num(c),
                );
            }
        }
    }
    fams.push(f);

    let mut f = Family::new(
        "enilab_api_requests_total",
        Kind::Counter,
        "API requests served, by Action and HTTP status.",
    );
    for ((action, code), n) in requests_snapshot() {
        f.add(
            vec![("action", action), ("code", code.to_string())],
            n as f64,
        );
    }
    fams.push(f);

    let mut out = String::new();
    for f in &fams {
        f.write(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture() -> Value {
        json!({
            "instances": [
                {"id": "i-1", "state": "running"},
                {"id": "i-2", "state": "running"},
                {"id": "i-3", "state": "stopped"}
            ],
            "enis": [{"id": "eni-1"}, {"id": "eni-2"}],
            "card_allowances": [{"instance": "i-1", "card": 1, "ports": [3],
                                 "pps_allowance_exceeded": 21, "bw_in_allowance_exceeded": 22,
                                 "bw_out_allowance_exceeded": 23}],
            "driver": {
                "devices": [{
                    "eni": "eni-1", "instance": "i-1", "card": 1, "port": 3,
                    "stats": {"rx_packets": 7, "rx_bytes": 700, "tx_packets": 5, "tx_bytes": 500,
                              "new_flows": 2, "arp_replies": 1, "dhcp_replies": 1,
                              "pps_allowance_exceeded": 11, "bw_in_allowance_exceeded": 12,
                              "bw_out_allowance_exceeded": 13, "linklocal_allowance_exceeded": 14,
                              "conntrack_allowance_exceeded": 15, "conntrack_tracked": 16,
                              "conntrack_allowance_available": 17,
                              "drops": {"no_route": 4, "security_group": 0}}
                }, {
                    "eni": "eni-2", "instance": "i-2", "card": 0, "port": 4,
                    "stats": {"conntrack_allowance_available": null}
                }],
                "cards": [{"card": 1, "workers": 2, "forwarded": 12, "dropped": 3, "wakeups": 9}],
                "hyperplane": {"nodes": [
                    {"node": 0, "running": true, "flows": 10, "own_flows": 6, "replication_lag": 1,
                     "port_allocation_failures": 2, "frames_in": 30, "frames_out": 29,
                     "table_bytes": 4096, "drops": {"no_owner": 3}}
                ]}
            }
        })
    }

    /// Sample lines (`name{labels} value`) of an exposition.
    fn samples(t: &str) -> Vec<&str> {
        t.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn fixture_series_have_their_values() {
        let t = render(&fixture());
        let cases = [
            (
                "enilab_eni_rx_packets_total{eni=\"eni-1\",instance=\"i-1\",card=\"1\"}",
                "7",
            ),
            (
                "enilab_eni_tx_bytes_total{eni=\"eni-1\",instance=\"i-1\",card=\"1\"}",
                "500",
            ),
            (
                "enilab_eni_drops_total{eni=\"eni-1\",instance=\"i-1\",card=\"1\",reason=\"no_route\"}",
                "4",
            ),
            ("enilab_card_forwarded_total{card=\"1\"}", "12"),
            (
                "enilab_eni_pps_allowance_exceeded_total{eni=\"eni-1\",instance=\"i-1\",card=\"1\"}",
                "11",
            ),
            (
                "enilab_eni_bw_in_allowance_exceeded_total{eni=\"eni-1\",instance=\"i-1\",card=\"1\"}",
                "12",
            ),
            (
                "enilab_eni_bw_out_allowance_exceeded_total{eni=\"eni-1\",instance=\"i-1\",card=\"1\"}",
                "13",
            ),
            (
                "enilab_eni_linklocal_allowance_exceeded_total{eni=\"eni-1\",instance=\"i-1\",card=\"1\"}",
                "14",
            ),
            (
                "enilab_eni_conntrack_allowance_exceeded_total{eni=\"eni-1\",instance=\"i-1\",card=\"1\"}",
                "15",
            ),
            (
                "enilab_eni_conntrack_tracked{eni=\"eni-1\",instance=\"i-1\",card=\"1\"}",
                "16",
            ),
            (
                "enilab_eni_conntrack_allowance_available{eni=\"eni-1\",instance=\"i-1\",card=\"1\"}",
                "17",
            ),
            (
                "enilab_card_pps_allowance_exceeded_total{instance=\"i-1\",card=\"1\"}",
                "21",
            ),
            (
                "enilab_card_bw_in_allowance_exceeded_total{instance=\"i-1\",card=\"1\"}",
                "22",
            ),
            (
                "enilab_card_bw_out_allowance_exceeded_total{instance=\"i-1\",card=\"1\"}",
                "23",
            ),
            ("enilab_card_workers{card=\"1\"}", "2"),
            ("enilab_hyperplane_own_flows{node=\"0\"}", "6"),
            ("enilab_hyperplane_node_running{node=\"0\"}", "1"),
            ("enilab_hyperplane_replication_lag{node=\"0\"}", "1"),
            (
                "enilab_hyperplane_port_allocation_failures_total{node=\"0\"}",
                "2",
            ),
            (
                "enilab_hyperplane_drops_total{node=\"0\",reason=\"no_owner\"}",
                "3",
            ),
            ("enilab_instances{state=\"running\"}", "2"),
            ("enilab_instances{state=\"stopped\"}", "1"),
            ("enilab_network_interfaces", "2"),
        ];
        let s = samples(&t);
        for (series, value) in cases {
            let want = format!("{series} {value}");
            assert!(s.contains(&want.as_str()), "missing {want:?} in\n{t}");
        }
        // An interface without a conntrack allowance has no "available".
        assert!(
            !t.contains("enilab_eni_conntrack_allowance_available{eni=\"eni-2\""),
            "{t}"
        );
        assert!(
            s.contains(
                &"enilab_eni_conntrack_tracked{eni=\"eni-2\",instance=\"i-2\",card=\"0\"} 0"
            ),
            "{t}"
        );
    }

    #[test]
    fn every_family_has_help_and_type_before_its_samples() {
        let t = render(&fixture());
        let mut declared = std::collections::BTreeSet::new();
        let mut helped = std::collections::BTreeSet::new();
        for l in t.lines() {
            if let Some(r) = l.strip_prefix("# HELP ") {
                helped.insert(r.split(' ').next().unwrap_or("").to_string());
            } else if let Some(r) = l.strip_prefix("# TYPE ") {
                let name = r.split(' ').next().unwrap_or("").to_string();
                assert!(helped.contains(&name), "TYPE before HELP: {l}");
                assert!(declared.insert(name), "family declared twice: {l}");
            } else {
                let name = l.split(['{', ' ']).next().unwrap_or("");
                assert!(declared.contains(name), "sample without TYPE: {l}");
            }
        }
        assert!(declared.len() >= 20, "{declared:?}");
    }

    #[test]
    fn label_values_are_escaped() {
        let cases = [
            ("plain", "plain"),
            ("a\"b", "a\\\"b"),
            ("a\\b", "a\\\\b"),
            ("line\nnext", "line\\nnext"),
        ];
        for (raw, want) in cases {
            assert_eq!(escape_label(raw), want);
        }
        let mut v = fixture();
        v["driver"]["devices"][0]["instance"] = json!("i-\"x\"\n");
        let t = render(&v);
        assert!(t.contains("instance=\"i-\\\"x\\\"\\n\""), "{t}");
    }

    #[test]
    fn request_counter_bounds_odd_actions() {
        count_request(Some("DescribeVpcsUnitTest"), 200);
        count_request(Some("DescribeVpcsUnitTest"), 200);
        count_request(Some("bad action\n"), 400);
        count_request(None, 400);
        let t = render(&json!({}));
        assert!(
            t.contains("enilab_api_requests_total{action=\"DescribeVpcsUnitTest\",code=\"200\"} 2"),
            "{t}"
        );
        assert!(t.contains("action=\"other\",code=\"400\""), "{t}");
        assert!(t.contains("action=\"none\",code=\"400\""), "{t}");
        assert!(!t.contains("bad action"), "{t}");
    }

    #[test]
    fn empty_status_still_declares_families() {
        let t = render(&Value::Null);
        assert!(t.contains("# TYPE enilab_eni_drops_total counter"));
        assert!(t.contains("# TYPE enilab_hyperplane_flows gauge"));
        assert!(!t.contains("enilab_eni_rx_packets_total{"));
    }
}
