//! `enilab-agent`: the guest agent daemon. Started (and restarted) by init.
//!
//! Usage: `enilab-agent [--port NAME] [--device PATH] [--no-net] [--no-eni]`
//!        `enilab-agent kv --listen ADDR [--replica ADDR]` (see `kv`)
//!        `enilab-agent kv-client ADDR SECONDS`
//!        `enilab-agent echo ADDR`, `enilab-agent probe ADDR INTERVAL_MS SECONDS`
//!        `enilab-agent attack KIND IF SECONDS SRC_IP DST_IP` (see `attack`)
//!        `enilab-agent blast|sink tcp|udp ADDR SECONDS` (see `blast`)
//!   --port NAME    virtio-serial port name (default org.enilab.agent)
//!   --device PATH  serve on this character device instead of looking up
//!                  the port in sysfs
//!   --no-net       do not run the interface/DHCP watcher (nor the ENI
//!                  configuration)
//!   --no-eni       do not configure ENIs from instance metadata
//! The kernel parameters `enilab.net=off` and `enilab.eni=off` do the same.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use enilab_agent::{attack, blast, eni, guest, kv, net, probe, proto, server, sys};

fn log(msg: &str) {
    eprintln!("enilab-agent: {msg}");
}

fn usage() -> ! {
    eprintln!("usage: enilab-agent [--port NAME] [--device PATH] [--no-net] [--no-eni]");
    std::process::exit(2);
}

/// `echo ADDR` or `probe ADDR INTERVAL_MS SECONDS` (see `probe`).
fn test_service(mode: &str, args: &[String]) -> i32 {
    let addr: Option<std::net::SocketAddr> = args.first().and_then(|a| a.parse().ok());
    let Some(addr) = addr else {
        eprintln!("enilab-agent {mode}: expected an address like 10.0.1.5:7001");
        return 2;
    };
    if mode == "echo" {
        let me = guest::kernel_params()
            .get("instance")
            .cloned()
            .unwrap_or_else(|| "?".to_string());
        return match probe::echo(addr, &me) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("enilab-agent echo: {e}");
                1
            }
        };
    }
    let num = |i: usize| args.get(i).and_then(|s| s.parse::<u64>().ok());
    let (Some(ms), Some(secs)) = (num(1), num(2)) else {
        eprintln!("enilab-agent probe: ADDR INTERVAL_MS SECONDS");
        return 2;
    };
    match probe::probe(
        addr,
        Duration::from_millis(ms.max(1)),
        Duration::from_secs(secs),
    ) {
        Ok(r) => {
            println!("{}", r.json());
            0
        }
        Err(e) => {
            eprintln!("enilab-agent probe: {e}");
            1
        }
    }
}

fn main() {
    let boot_ms = sys::uptime_ms();
    let mut port = proto::PORT_NAME.to_string();
    let mut device: Option<PathBuf> = None;
    let mut run_net = true;
    let mut run_eni = true;
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Some(mode @ ("kv" | "kv-client")) = argv.first().map(String::as_str) {
        match kv::main(mode, &argv[1..]) {
            Ok(()) => return,
            Err(e) => {
                eprintln!("enilab-agent {mode}: {e}");
                std::process::exit(2);
            }
        }
    }
    if let Some(mode @ ("blast" | "sink")) = argv.first().map(String::as_str) {
        std::process::exit(blast::main(mode, &argv[1..]));
    }
    if argv.first().map(String::as_str) == Some("attack") {
        let a = &argv[1..];
        let parsed = (
            a.first(),
            a.get(1),
            a.get(2).and_then(|s| s.parse::<u64>().ok()),
            a.get(3).and_then(|s| s.parse().ok()),
            a.get(4).and_then(|s| s.parse().ok()),
        );
        let (Some(kind), Some(ifname), Some(secs), Some(src), Some(dst)) = parsed else {
            eprintln!("usage: enilab-agent attack KIND IF SECONDS SRC_IP DST_IP");
            std::process::exit(2);
        };
        match attack::run(kind, ifname, secs, src, dst) {
            Ok(n) => {
                println!("sent {n}");
                return;
            }
            Err(e) => {
                eprintln!("enilab-agent attack: {e}");
                std::process::exit(1);
            }
        }
    }
    if let Some(mode @ ("echo" | "probe")) = argv.first().map(String::as_str) {
        std::process::exit(test_service(mode, &argv[1..]));
    }
    let mut args = argv.into_iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().unwrap_or_else(|| usage()),
            "--device" => device = Some(args.next().unwrap_or_else(|| usage()).into()),
            "--no-net" => run_net = false,
            "--no-eni" => run_eni = false,
            "--version" => {
                println!(
                    "enilab-agent {} (protocol {})",
                    env!("CARGO_PKG_VERSION"),
                    proto::PROTOCOL_VERSION
                );
                return;
            }
            _ => usage(),
        }
    }
    if std::env::var_os("PATH").is_none() {
        std::env::set_var(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    if std::env::var_os("HOME").is_none() {
        std::env::set_var("HOME", "/root");
    }
    let params = guest::kernel_params();
    if params.get("net").is_some_and(|v| v == "off") {
        run_net = false;
    }
    if params.get("eni").is_some_and(|v| v == "off") {
        run_eni = false;
    }
    log(&format!(
        "version {} starting {} ms after boot",
        env!("CARGO_PKG_VERSION"),
        boot_ms
    ));

    let stop = Arc::new(AtomicBool::new(false));
    if run_net {
        let stop = stop.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("agent-net".into())
            .spawn(move || net::watch(net::NetConfig::default(), stop))
        {
            log(&format!("cannot start the interface watcher: {e}"));
        }
    }
    if run_net && run_eni {
        let stop = stop.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("agent-eni".into())
            .spawn(move || eni::watch(eni::EniConfig::default(), stop))
        {
            log(&format!("cannot start the ENI configuration: {e}"));
        }
    }

    let opts = server::ServeOptions {
        reconnectable: true,
        // Frequent enough for the host to call a guest hung within ~1 s.
        heartbeat: Duration::from_millis(200),
        hello: Arc::new(move || guest::system_hello(boot_ms)),
        stop,
    };
    let mut waited = false;
    loop {
        let opened = match &device {
            Some(p) => guest::open_rw(p).map(|fd| Some((p.clone(), fd))),
            None => guest::open_port(&port),
        };
        match opened {
            Ok(Some((path, fd))) => {
                log(&format!("serving on {} (port {port})", path.display()));
                if let Err(e) = server::serve(fd, opts.clone()) {
                    log(&format!("serve loop failed: {e}; reopening in 1 s"));
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            Ok(None) => {
                if !waited {
                    log(&format!("waiting for virtio-serial port {port}"));
                    waited = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                log(&format!("cannot open the agent port: {e}; retrying in 1 s"));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}
