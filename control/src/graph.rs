//! `enilab graph`: the lab as a Graphviz picture.
//!
//! Two status documents taken a second apart give the topology (VPCs,
//! subnets, instances, ENIs with device and card index, internet and NAT
//! gateways, load balancers and their targets) and each ENI's traffic rate.
//! [`to_dot`] writes Graphviz dot; [`render`] runs `dot` (Debian's
//! graphviz) for SVG or PNG, and says so when `dot` is missing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

/// Failures drawing the graph.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("cannot run `dot` (install graphviz)")]
    NoDot(#[source] std::io::Error),
    #[error("`dot` failed: {0}")]
    Dot(String),
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A dot double-quoted string (labels use `\n` for line breaks).
fn q(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Bytes per second as B/s, kB/s, MB/s.
pub fn rate(bps: f64) -> String {
    if bps >= 1e6 {
        format!("{:.1} MB/s", bps / 1e6)
    } else if bps >= 1e3 {
        format!("{:.1} kB/s", bps / 1e3)
    } else {
        format!("{bps:.0} B/s")
    }
}

/// Per ENI (rx, tx) bytes per second between two status documents taken
/// `secs` apart (ENIs without a device in both are left out).
pub fn rates(before: &Value, after: &Value, secs: f64) -> BTreeMap<String, (f64, f64)> {
    let mut out = BTreeMap::new();
    if secs <= 0.0 {
        return out;
    }
    let stats = |v: &Value| -> BTreeMap<String, (f64, f64)> {
        arr(&v["driver"]["devices"])
            .iter()
            .map(|d| {
                let st = &d["stats"];
                (
                    s(&d["eni"]),
                    (
                        st["rx_bytes"].as_f64().unwrap_or(0.0),
                        st["tx_bytes"].as_f64().unwrap_or(0.0),
                    ),
                )
            })
            .collect()
    };
    let b = stats(before);
    for (eni, (rx, tx)) in stats(after) {
        if let Some((rx0, tx0)) = b.get(&eni) {
            let d = |a: f64, b: f64| if a >= b { (a - b) / secs } else { 0.0 };
            out.insert(eni, (d(rx, *rx0), d(tx, *tx0)));
        }
    }
    out
}

/// The topology of `status` as dot, with `rates` on the ENIs.
pub fn to_dot(status: &Value, rates: &BTreeMap<String, (f64, f64)>) -> String {
    let names = &status["names"];
    let named = |id: &str| match names[id].as_str() {
        Some(n) => format!("{n}\n{id}"),
        None => id.to_string(),
    };
    let gw = &status["gateways"];
    let mut out = String::from(
        "digraph enilab {\n  graph [rankdir=LR, fontname=\"Helvetica\", compound=true, label=\"enilab\", labelloc=t];\n  node [fontname=\"Helvetica\", fontsize=10];\n  edge [fontname=\"Helvetica\", fontsize=9];\n",
    );
    let subnets = arr(&status["subnets"]);
    let instances = arr(&status["instances"]);
    let enis = arr(&status["enis"]);
    let nats = arr(&gw["nat_gateways"]);
    let lbs = arr(&gw["load_balancers"]);
    let service_enis: BTreeMap<String, String> = nats
        .iter()
        .map(|n| (s(&n["eni"]), s(&n["id"])))
        .chain(lbs.iter().flat_map(|l| {
            arr(&l["nodes"])
                .iter()
                .map(move |n| (s(&n["eni"]), s(&l["id"])))
        }))
        .collect();
    for (vi, vpc) in arr(&status["vpcs"]).iter().enumerate() {
        let vpc_id = s(&vpc["id"]);
        let _ = writeln!(
            out,
            "  subgraph cluster_vpc_{vi} {{\n    label={};\n    style=rounded; color=\"#1f77b4\";",
            q(&format!("{}\n{}", named(&vpc_id), s(&vpc["cidr"])))
        );
        for (si, sub) in subnets
            .iter()
            .enumerate()
            .filter(|(_, x)| x["vpc"] == vpc["id"])
        {
            let sub_id = s(&sub["id"]);
            let _ = writeln!(
                out,
                "    subgraph cluster_subnet_{vi}_{si} {{\n      label={};\n      style=filled; fillcolor=\"#f4f8fb\"; color=\"#9ab\";",
                q(&format!("{}\n{} {}", named(&sub_id), s(&sub["cidr"]), s(&sub["az"])))
            );
            for i in instances.iter().filter(|i| i["subnet"] == sub["id"]) {
                let id = s(&i["id"]);
                let _ = writeln!(
                    out,
                    "      {} [shape=box, style=\"rounded,filled\", fillcolor=\"#fff3d6\", label={}];",
                    q(&id),
                    q(&format!("{}\n{} · {}", named(&id), s(&i["type"]), s(&i["state"])))
                );
            }
            for e in enis.iter().filter(|e| e["subnet"] == sub["id"]) {
                let id = s(&e["id"]);
                let mut label = format!("{}\n{}", named(&id), s(&e["ips"][0]));
                if !e["device"].is_null() {
                    let _ = write!(
                        label,
                        "\ndevice {} · card {}",
                        s(&e["device"]),
                        s(&e["card"])
                    );
                }
                if let Some((rx, tx)) = rates.get(&id) {
                    let _ = write!(label, "\nrx {} · tx {}", rate(*rx), rate(*tx));
                }
                let _ = writeln!(
                    out,
                    "      {} [shape=ellipse, style=filled, fillcolor=\"#e3f1e3\", label={}];",
                    q(&id),
                    q(&label)
                );
            }
            for n in nats.iter().filter(|n| n["subnet"] == sub["id"]) {
                let ips = arr(&n["public_ips"])
                    .iter()
                    .map(s)
                    .collect::<Vec<_>>()
                    .join(",");
                let _ = writeln!(
                    out,
                    "      {} [shape=octagon, style=filled, fillcolor=\"#fde0dd\", label={}];",
                    q(&s(&n["id"])),
                    q(&format!(
                        "NAT gateway\n{}\n{} {}",
                        s(&n["id"]),
                        ips,
                        s(&n["state"])
                    ))
                );
            }
            out.push_str("    }\n");
        }
        for g in arr(&gw["internet_gateways"])
            .iter()
            .filter(|g| g["vpc"] == vpc["id"])
        {
            let _ = writeln!(
                out,
                "    {} [shape=house, style=filled, fillcolor=\"#dbe9f6\", label={}];",
                q(&s(&g["id"])),
                q(&format!("internet gateway\n{}", s(&g["id"])))
            );
        }
        for l in lbs.iter().filter(|l| l["vpc"] == vpc["id"]) {
            let _ = writeln!(
                out,
                "    {} [shape=doubleoctagon, style=filled, fillcolor=\"#e8e0f4\", label={}];",
                q(&s(&l["id"])),
                q(&format!(
                    "NLB {}\n{} · {}",
                    s(&l["name"]),
                    s(&l["scheme"]),
                    s(&l["state"])
                ))
            );
        }
        out.push_str("  }\n");
    }
    // Edges: instance -> ENI (device, card), services -> their ENIs,
    // gateways -> the internet, load balancers -> targets.
    for e in enis {
        let id = s(&e["id"]);
        if !e["instance"].is_null() {
            let _ = writeln!(
                out,
                "  {} -> {} [label={}, arrowhead=none];",
                q(&s(&e["instance"])),
                q(&id),
                q(&format!("eth{} / card {}", s(&e["device"]), s(&e["card"])))
            );
        } else if let Some(svc) = service_enis.get(&id) {
            let _ = writeln!(
                out,
                "  {} -> {} [arrowhead=none, style=dotted];",
                q(svc),
                q(&id)
            );
        }
    }
    let igws = arr(&gw["internet_gateways"]);
    if igws.iter().any(|g| !g["vpc"].is_null()) {
        out.push_str("  \"internet\" [shape=ellipse, style=dashed, label=\"internet\"];\n");
        for g in igws.iter().filter(|g| !g["vpc"].is_null()) {
            let _ = writeln!(out, "  {} -> \"internet\" [dir=both];", q(&s(&g["id"])));
        }
    }
    let tgs: BTreeMap<String, &Value> = arr(&gw["target_groups"])
        .iter()
        .map(|t| (s(&t["id"]), t))
        .collect();
    for l in lbs {
        for tg in tgs.values().filter(|t| t["vpc"] == l["vpc"]) {
            for t in arr(&tg["targets"]) {
                if instances.iter().any(|i| i["id"] == *t) {
                    let _ = writeln!(
                        out,
                        "  {} -> {} [style=dashed, color=\"#6a51a3\", label={}];",
                        q(&s(&l["id"])),
                        q(&s(t)),
                        q(&format!("{}:{}", s(&tg["name"]), s(&tg["port"])))
                    );
                }
            }
        }
    }
    out.push_str("}\n");
    out
}

/// Run `dot -T<format>` on `dot`.
pub fn render(dot: &str, format: &str) -> Result<Vec<u8>, GraphError> {
    let mut child = Command::new("dot")
        .arg(format!("-T{format}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(GraphError::NoDot)?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(dot.as_bytes()).map_err(GraphError::NoDot)?;
    }
    let out = child.wait_with_output().map_err(GraphError::NoDot)?;
    if !out.status.success() {
        return Err(GraphError::Dot(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(out.stdout)
}

/// The output format an output path asks for (by extension).
pub fn format_of(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("png") => "png",
        Some("dot") | Some("gv") => "dot",
        _ => "svg",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn topology() -> Value {
        json!({
            "vpcs": [{"id": "vpc-1", "cidr": "10.0.0.0/16"}],
            "subnets": [
                {"id": "subnet-pub", "vpc": "vpc-1", "cidr": "10.0.1.0/24", "az": "us-east-1a"},
                {"id": "subnet-app", "vpc": "vpc-1", "cidr": "10.0.2.0/24", "az": "us-east-1a"}
            ],
            "instances": [
                {"id": "i-web", "type": "m5.large", "state": "running", "subnet": "subnet-pub"},
                {"id": "i-app", "type": "t3.micro", "state": "running", "subnet": "subnet-app"}
            ],
            "enis": [
                {"id": "eni-w0", "subnet": "subnet-pub", "ips": ["10.0.1.10"], "instance": "i-web", "device": 0, "card": 0},
                {"id": "eni-w1", "subnet": "subnet-app", "ips": ["10.0.2.11"], "instance": "i-web", "device": 1, "card": 0},
                {"id": "eni-a0", "subnet": "subnet-app", "ips": ["10.0.2.20"], "instance": "i-app", "device": 0, "card": 0},
                {"id": "eni-nat", "subnet": "subnet-pub", "ips": ["10.0.1.5"], "instance": null, "device": null, "card": null}
            ],
            "names": {"i-web": "web \"front\""},
            "gateways": {
                "internet_gateways": [{"id": "igw-1", "vpc": "vpc-1"}],
                "nat_gateways": [{"id": "nat-1", "vpc": "vpc-1", "subnet": "subnet-pub", "eni": "eni-nat", "state": "available", "public_ips": ["203.0.113.5"]}],
                "load_balancers": [{"id": "loadbalancer/net/front/1", "name": "front", "vpc": "vpc-1", "scheme": "internet-facing", "state": "active", "nodes": []}],
                "target_groups": [{"id": "targetgroup/app/1", "name": "app", "vpc": "vpc-1", "port": 80, "targets": ["i-app"]}]
            },
            "driver": {"devices": [{"eni": "eni-w0", "stats": {"rx_bytes": 1000, "tx_bytes": 500}}]}
        })
    }

    #[test]
    fn rates_are_deltas_per_second() {
        let a = topology();
        let mut b = topology();
        b["driver"]["devices"][0]["stats"] = json!({"rx_bytes": 3000, "tx_bytes": 500});
        let r = rates(&a, &b, 2.0);
        assert_eq!(r.get("eni-w0"), Some(&(1000.0, 0.0)));
        assert!(rates(&a, &b, 0.0).is_empty());
        // A reset counter (reused port) gives 0, not a negative rate.
        assert_eq!(rates(&b, &a, 1.0).get("eni-w0"), Some(&(0.0, 0.0)));
        let cases = [(12.0, "12 B/s"), (1500.0, "1.5 kB/s"), (2.5e6, "2.5 MB/s")];
        for (bps, want) in cases {
            assert_eq!(rate(bps), want);
        }
    }

    #[test]
    fn dot_names_everything_and_escapes_labels() {
        let mut r = BTreeMap::new();
        r.insert("eni-w0".to_string(), (2048.0, 10.0));
        let d = to_dot(&topology(), &r);
        for id in [
            "vpc-1",
            "subnet-pub",
            "subnet-app",
            "\"i-web\"",
            "\"i-app\"",
            "\"eni-w0\"",
            "\"eni-w1\"",
            "\"eni-a0\"",
            "\"igw-1\"",
            "\"nat-1\"",
            "NLB front",
        ] {
            assert!(d.contains(id), "{id} missing:\n{d}");
        }
        assert!(d.contains("device 1 · card 0"), "{d}");
        assert!(d.contains("rx 2.0 kB/s · tx 10 B/s"), "{d}");
        assert!(
            d.contains("\"i-web\" -> \"eni-w1\" [label=\"eth1 / card 0\""),
            "{d}"
        );
        assert!(d.contains("\"nat-1\" -> \"eni-nat\""), "{d}");
        assert!(d.contains("-> \"i-app\" [style=dashed"), "{d}");
        assert!(d.contains("web \\\"front\\\"\\ni-web"), "{d}");
    }

    #[test]
    fn dot_renders_when_graphviz_is_present() {
        let d = to_dot(&topology(), &BTreeMap::new());
        match render(&d, "svg") {
            Ok(svg) => {
                // Graphviz writes '-' as a character reference.
                let t = String::from_utf8_lossy(&svg).replace("&#45;", "-");
                assert!(t.contains("<svg"), "{t}");
                assert!(t.contains("i-web") && t.contains("eni-a0"));
            }
            Err(GraphError::NoDot(_)) => eprintln!("skipped: graphviz `dot` missing"),
            Err(e) => panic!("{e}"),
        }
    }
}
