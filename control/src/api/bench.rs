//! `enilab bench-api`: API calls per second against a running daemon, over
//! keep-alive HTTP/1.1 connections (a minimal client on std sockets).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Failures of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot talk to {0}")]
    Io(SocketAddr, #[source] std::io::Error),
    /// The daemon answered something unexpected.
    #[error("unexpected answer to {0}: {1}")]
    Answer(String, String),
}

/// One keep-alive connection.
pub struct Client {
    addr: SocketAddr,
    r: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Result<Client, BenchError> {
        let s = TcpStream::connect(addr).map_err(|e| BenchError::Io(addr, e))?;
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        Ok(Client {
            addr,
            r: BufReader::new(s),
        })
    }

    /// POST a form body; the status and the response body.
    pub fn post(&mut self, body: &str) -> Result<(u16, String), BenchError> {
        let addr = self.addr;
        let io = |e| BenchError::Io(addr, e);
        let req = format!(
            "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.r.get_mut().write_all(req.as_bytes()).map_err(io)?;
        let mut line = String::new();
        self.r.read_line(&mut line).map_err(io)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| BenchError::Answer("status line".into(), line.clone()))?;
        let mut len = 0usize;
        loop {
            line.clear();
            self.r.read_line(&mut line).map_err(io)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut buf = vec![0u8; len];
        self.r.read_exact(&mut buf).map_err(io)?;
        Ok((status, String::from_utf8_lossy(&buf).into_owned()))
    }
}

/// Test helper: the text of the first `<name>` element, or a panic that
/// shows the body.
#[cfg(test)]
pub(crate) fn field(body: &str, name: &str) -> String {
    extract(body, name)
        .unwrap_or_else(|| panic!("no <{name}> in {body}"))
        .to_string()
}

/// The text between `<tag>` and `</tag>`, first occurrence.
pub fn extract<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let s = xml.find(&open)? + open.len();
    let e = xml[s..].find(&close)? + s;
    Some(&xml[s..e])
}

fn call(c: &mut Client, body: &str, tag: &str) -> Result<String, BenchError> {
    let (st, xml) = c.post(body)?;
    if st != 200 {
        return Err(BenchError::Answer(body.to_string(), xml));
    }
    extract(&xml, tag)
        .map(String::from)
        .ok_or_else(|| BenchError::Answer(body.to_string(), xml.clone()))
}

/// Run `body_for(i)` on `conns` connections for `dur`; calls per second.
fn measure(
    addr: SocketAddr,
    dur: Duration,
    conns: usize,
    body_for: impl Fn(usize, u64) -> String + Sync,
) -> Result<(u64, f64), BenchError> {
    let start = Instant::now();
    let results: Vec<Result<u64, BenchError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..conns.max(1))
            .map(|w| {
                let body_for = &body_for;
                s.spawn(move || {
                    let mut c = Client::connect(addr)?;
                    let mut n = 0u64;
                    while start.elapsed() < dur {
                        let (st, xml) = c.post(&body_for(w, n))?;
                        if st != 200 {
                            return Err(BenchError::Answer("measured call".into(), xml));
                        }
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(BenchError::Answer("worker".into(), "panicked".into())))
            })
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let mut total = 0;
    for r in results {
        total += r?;
    }
    Ok((total, total as f64 / secs))
}

/// Builds the body of call `n` on worker `w`.
type BodyFn<'a> = Box<dyn Fn(usize, u64) -> String + Sync + 'a>;

/// Create a VPC and a /16 subnet, then measure DescribeVpcs,
/// DescribeNetworkInterfaces (filtered), CreateTags and
/// CreateNetworkInterface.
pub fn run(addr: SocketAddr, dur: Duration, conns: usize) -> Result<String, BenchError> {
    let v = "&Version=2016-11-15";
    let mut c = Client::connect(addr)?;
    let vpc = call(
        &mut c,
        &format!("Action=CreateVpc{v}&CidrBlock=10.0.0.0%2F16"),
        "vpcId",
    )?;
    let subnet = call(
        &mut c,
        &format!("Action=CreateSubnet{v}&VpcId={vpc}&CidrBlock=10.0.0.0%2F16"),
        "subnetId",
    )?;
    let eni = call(
        &mut c,
        &format!("Action=CreateNetworkInterface{v}&SubnetId={subnet}"),
        "networkInterfaceId",
    )?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "enilab bench-api: {addr}, {conns} connections, {}s per action",
        dur.as_secs()
    );
    let cases: Vec<(&str, BodyFn)> = vec![
        (
            "DescribeVpcs (one VPC by ID)",
            Box::new(|_, _| format!("Action=DescribeVpcs{v}&VpcId.1={vpc}")),
        ),
        (
            "DescribeNetworkInterfaces (filter subnet-id, MaxResults=5)",
            Box::new(|_, _| {
                format!("Action=DescribeNetworkInterfaces{v}&Filter.1.Name=subnet-id&Filter.1.Value.1={subnet}&MaxResults=5")
            }),
        ),
        (
            "CreateTags (one tag on one ENI)",
            Box::new(|w, n| {
                format!("Action=CreateTags{v}&ResourceId.1={eni}&Tag.1.Key=k{w}&Tag.1.Value={n}")
            }),
        ),
        (
            "CreateNetworkInterface (address allocation + commit)",
            Box::new(|_, _| format!("Action=CreateNetworkInterface{v}&SubnetId={subnet}")),
        ),
    ];
    for (name, f) in cases {
        let (n, rate) = measure(addr, dur, conns, f)?;
        let _ = writeln!(out, "{name:<62} {rate:>9.0} calls/s ({n} calls)");
    }
    let _ = writeln!(out, "(left behind: {vpc}, {subnet} and its interfaces)");
    Ok(out)
}
