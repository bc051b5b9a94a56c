//! `GET /enilab/status`: the lab at a glance, as JSON, for `enilab status`.
//! Not part of the EC2 API: resources as the store has them, plus what the
//! driver runs (guests, devices with their switch port, card and counters).

use serde_json::{json, Value};

use crate::store::model::{Eni, Instance, Subnet, Vpc};

use super::Api;

/// Where the daemon serves it.
pub const PATH: &str = "/enilab/status";

/// The status document.
pub fn collect(api: &Api) -> Value {
    let (vpcs, subnets, instances, enis) = api.store.read(|st| {
        let vpcs: Vec<Value> = st
            .iter::<Vpc>()
            .map(|v| json!({"id": v.id, "cidr": v.cidr}))
            .collect();
        let subnets: Vec<Value> = st
            .iter::<Subnet>()
            .map(|s| json!({"id": s.id, "vpc": s.vpc_id, "cidr": s.cidr, "az": s.az}))
            .collect();
        let instances: Vec<Value> = st
            .iter::<Instance>()
            .map(|i| {
                json!({
                    "id": i.id,
                    "type": i.instance_type,
                    "state": i.state.name(),
                    "subnet": i.subnet_id,
                })
            })
            .collect();
        let enis: Vec<Value> = st
            .iter::<Eni>()
            .map(|e| {
                let a = e.attachment.as_ref();
                json!({
                    "id": e.id,
                    "subnet": e.subnet_id,
                    "mac": e.mac,
                    "ips": e.private_ips.iter().map(|p| p.ip.clone()).collect::<Vec<_>>(),
                    "instance": a.map(|a| a.instance_id.clone()),
                    "device": a.map(|a| a.device_index),
                    "card": a.map(|a| a.card_index),
                    "status": a.map(|a| a.status.as_str()),
                })
            })
            .collect();
        (vpcs, subnets, instances, enis)
    });
    json!({
        "vpcs": vpcs,
        "subnets": subnets,
        "instances": instances,
        "enis": enis,
        "gateways": gateways(api),
        "card_allowances": api.driver.card_allowances(),
        "names": names(api),
        "driver": api.driver.status(),
    })
}

/// Internet gateways, NAT gateways, load balancers and target groups, for
/// `enilab graph`.
fn gateways(api: &Api) -> Value {
    use crate::store::model::{InternetGateway, LoadBalancer, NatGateway, TargetGroup};
    api.store.read(|st| {
        json!({
            "internet_gateways": st.iter::<InternetGateway>()
                .map(|g| json!({"id": g.id, "vpc": g.vpc_id}))
                .collect::<Vec<_>>(),
            "nat_gateways": st.iter::<NatGateway>()
                .map(|n| json!({"id": n.id, "vpc": n.vpc_id, "subnet": n.subnet_id,
                                "eni": n.eni_id, "state": n.state.as_str(),
                                "public_ips": n.addresses.iter()
                                    .filter_map(|a| a.public_ip.clone()).collect::<Vec<_>>()}))
                .collect::<Vec<_>>(),
            "load_balancers": st.iter::<LoadBalancer>()
                .map(|l| json!({"id": l.id, "name": l.name, "vpc": l.vpc_id,
                                "scheme": l.scheme, "state": l.state.as_str(),
                                "nodes": l.nodes.iter()
                                    .map(|n| json!({"subnet": n.subnet_id, "eni": n.eni_id}))
                                    .collect::<Vec<_>>()}))
                .collect::<Vec<_>>(),
            "target_groups": st.iter::<TargetGroup>()
                .map(|t| json!({"id": t.id, "name": t.name, "vpc": t.vpc_id,
                                "port": t.port,
                                "targets": t.targets.iter().map(|x| x.id.clone()).collect::<Vec<_>>()}))
                .collect::<Vec<_>>(),
        })
    })
}

/// The `Name` tag (else the `enilab:name` tag of `enilab up`) of every
/// resource that has one (id -> name).
fn names(api: &Api) -> Value {
    use crate::store::model::{Kind, Tags};
    fn add<K: Kind>(st: &crate::store::State, out: &mut serde_json::Map<String, Value>) {
        for r in st.iter::<K>() {
            let t: &Tags = r.tags();
            if let Some(n) = t.get("Name").or_else(|| t.get("enilab:name")) {
                out.insert(r.id().to_string(), json!(n));
            }
        }
    }
    api.store.read(|st| {
        let mut m = serde_json::Map::new();
        add::<Vpc>(st, &mut m);
        add::<Subnet>(st, &mut m);
        add::<Instance>(st, &mut m);
        add::<Eni>(st, &mut m);
        Value::Object(m)
    })
}

/// Failures fetching the status.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot reach the daemon at {0} (is `enilab serve` running?)")]
    Connect(std::net::SocketAddr, #[source] std::io::Error),
    #[error("the daemon at {0} answered something that is not a status document")]
    Answer(std::net::SocketAddr),
}

/// GET the status document from a daemon.
pub fn fetch(addr: std::net::SocketAddr) -> Result<Value, StatusError> {
    use std::io::{Read, Write};
    let io = |e| StatusError::Connect(addr, e);
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))
        .map_err(io)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .map_err(io)?;
    write!(
        s,
        "GET {PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(io)?;
    let text = String::from_utf8_lossy(&buf);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or(StatusError::Answer(addr))?;
    serde_json::from_str(body).map_err(|_| StatusError::Answer(addr))
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Rows as an aligned table with a header.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.len());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        l.trim_end().to_string() + "\n"
    };
    out.push_str(&line(header.to_vec()));
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
}

/// The status document as terminal tables.
pub fn render(v: &Value) -> String {
    let empty = Vec::new();
    let arr = |x: &Value| x.as_array().unwrap_or(&empty).clone();
    let driver = &v["driver"];
    let mut out = String::new();
    if let Some(a) = driver["accel"].as_str() {
        out.push_str(&format!(
            "guests: {a} ({})\n\n",
            cell(&driver["accel_reason"])
        ));
    }
    let vms = arr(&driver["vms"]);
    let rows: Vec<Vec<String>> = arr(&v["instances"])
        .iter()
        .map(|i| {
            let vm = vms.iter().find(|m| m["instance"] == i["id"]);
            vec![
                cell(&i["id"]),
                cell(&i["type"]),
                cell(&i["state"]),
                cell(&i["subnet"]),
                vm.map(|m| cell(&m["pid"])).unwrap_or_else(|| "-".into()),
                vm.map(|m| if m["agent"] == true { "up" } else { "down" }.to_string())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str("INSTANCES\n");
    table(
        &mut out,
        &["ID", "TYPE", "STATE", "SUBNET", "PID", "AGENT"],
        &rows,
    );
    let devices = arr(&driver["devices"]);
    let rows: Vec<Vec<String>> = arr(&v["enis"])
        .iter()
        .map(|e| {
            let d = devices.iter().find(|d| d["eni"] == e["id"]);
            let st = d.map(|d| &d["stats"]);
            let drops = st
                .map(|s| {
                    s["drops"]
                        .as_object()
                        .map(|o| o.values().filter_map(Value::as_u64).sum::<u64>())
                        .unwrap_or(0)
                        .to_string()
                })
                .unwrap_or_else(|| "-".into());
            vec![
                cell(&e["id"]),
                cell(&e["instance"]),
                cell(&e["device"]),
                cell(&e["card"]),
                cell(&e["status"]),
                cell(&e["ips"]),
                cell(&e["mac"]),
                d.map(|d| cell(&d["port"])).unwrap_or_else(|| "-".into()),
                st.map(|s| cell(&s["rx_packets"]))
                    .unwrap_or_else(|| "-".into()),
                st.map(|s| cell(&s["tx_packets"]))
                    .unwrap_or_else(|| "-".into()),
                drops,
            ]
        })
        .collect();
    out.push_str("\nNETWORK INTERFACES\n");
    table(
        &mut out,
        &[
            "ID", "INSTANCE", "DEV", "CARD", "STATUS", "IPS", "MAC", "PORT", "RX", "TX", "DROPS",
        ],
        &rows,
    );
    let rows: Vec<Vec<String>> = arr(&driver["cards"])
        .iter()
        .map(|c| {
            vec![
                cell(&c["card"]),
                cell(&c["workers"]),
                cell(&c["forwarded"]),
                cell(&c["dropped"]),
                cell(&c["wakeups"]),
            ]
        })
        .collect();
    if !rows.is_empty() {
        out.push_str("\nNETWORK CARDS\n");
        table(
            &mut out,
            &["CARD", "WORKERS", "FORWARDED", "DROPPED", "WAKEUPS"],
            &rows,
        );
    }
    // Per (instance, card) aggregate allowances: limits and excess.
    let mbps = |v: &Value| match v.as_u64() {
        Some(0) | None => "-".to_string(),
        Some(b) => (b / 1_000_000).to_string(),
    };
    let rows: Vec<Vec<String>> = arr(&v["card_allowances"])
        .iter()
        .map(|c| {
            let l = &c["limits"];
            vec![
                cell(&c["instance"]),
                cell(&c["card"]),
                arr(&c["ports"]).len().to_string(),
                if l["pps"].as_u64().unwrap_or(0) == 0 {
                    "-".into()
                } else {
                    cell(&l["pps"])
                },
                mbps(&l["bw_out_bps"]),
                mbps(&l["bw_in_bps"]),
                cell(&c["pps_allowance_exceeded"]),
                cell(&c["bw_out_allowance_exceeded"]),
                cell(&c["bw_in_allowance_exceeded"]),
            ]
        })
        .collect();
    if !rows.is_empty() {
        out.push_str("\nCARD ALLOWANCES\n");
        table(
            &mut out,
            &[
                "INSTANCE", "CARD", "ENIS", "PPS", "OUT_MBPS", "IN_MBPS", "PPS_EXC", "OUT_EXC",
                "IN_EXC",
            ],
            &rows,
        );
    }
    let rows: Vec<Vec<String>> = arr(&v["subnets"])
        .iter()
        .map(|s| {
            vec![
                cell(&s["id"]),
                cell(&s["vpc"]),
                cell(&s["cidr"]),
                cell(&s["az"]),
            ]
        })
        .collect();
    out.push_str("\nSUBNETS\n");
    table(&mut out, &["ID", "VPC", "CIDR", "AZ"], &rows);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_section_aligned() {
        let v = json!({
            "vpcs": [{"id": "vpc-1", "cidr": "10.0.0.0/16"}],
            "subnets": [{"id": "subnet-1", "vpc": "vpc-1", "cidr": "10.0.1.0/24", "az": "us-east-1a"}],
            "instances": [{"id": "i-1", "type": "t3.micro", "state": "running", "subnet": "subnet-1"}],
            "enis": [
                {"id": "eni-1", "instance": "i-1", "device": 0, "card": 0, "status": "attached",
                 "ips": ["10.0.1.4", "10.0.1.9"], "mac": "02:00:00:00:00:01", "subnet": "subnet-1"},
                {"id": "eni-2", "instance": null, "device": null, "card": null, "status": null,
                 "ips": ["10.0.1.5"], "mac": "02:00:00:00:00:02", "subnet": "subnet-1"}
            ],
            "driver": {
                "accel": "tcg", "accel_reason": "forced",
                "vms": [{"instance": "i-1", "pid": 42, "agent": true}],
                "devices": [{"eni": "eni-1", "port": 3, "card": 0,
                             "stats": {"rx_packets": 7, "tx_packets": 5, "drops": {"malformed": 2, "no_route": 1}}}],
                "cards": [{"card": 0, "workers": 1, "forwarded": 12, "dropped": 3, "wakeups": 4}]
            },
            "card_allowances": [{"instance": "i-1", "card": 0, "ports": [3, 4],
                                 "limits": {"pps": 0, "bw_out_bps": 5_000_000_000u64, "bw_in_bps": 2_000_000},
                                 "pps_allowance_exceeded": 6, "bw_out_allowance_exceeded": 7,
                                 "bw_in_allowance_exceeded": 8}]
        });
        let t = render(&v);
        assert!(t.starts_with("guests: tcg (forced)"), "{t}");
        let eni1 = t
            .lines()
            .find(|l| l.starts_with("eni-1"))
            .expect("eni-1 row");
        let cols: Vec<&str> = eni1.split_whitespace().collect();
        assert_eq!(
            cols,
            [
                "eni-1",
                "i-1",
                "0",
                "0",
                "attached",
                "10.0.1.4,10.0.1.9",
                "02:00:00:00:00:01",
                "3",
                "7",
                "5",
                "3"
            ]
        );
        let eni2 = t
            .lines()
            .find(|l| l.starts_with("eni-2"))
            .expect("eni-2 row");
        assert_eq!(eni2.split_whitespace().nth(1), Some("-"));
        let inst = t
            .lines()
            .find(|l| l.starts_with("i-1"))
            .expect("instance row");
        assert!(inst.ends_with("42  up") || inst.contains(" 42 "), "{inst}");
        let header = t
            .lines()
            .find(|l| l.starts_with("ID  ") && l.contains("INSTANCE"))
            .expect("header");
        assert_eq!(
            header.find("INSTANCE"),
            eni1.find(" i-1").map(|i| i + 1),
            "columns aligned"
        );
        assert!(t.contains("NETWORK CARDS"));
        let (_, allowances) = t.split_once("CARD ALLOWANCES\n").expect("card allowances");
        let row: Vec<&str> = allowances
            .lines()
            .nth(1)
            .expect("a card row")
            .split_whitespace()
            .collect();
        assert_eq!(row, ["i-1", "0", "2", "-", "5000", "2", "6", "7", "8"]);
    }
}
