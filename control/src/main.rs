//! The `enilab` command: argument parsing that hands off to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use enilab_control::agent::{AgentClient, Stream};
use enilab_control::{api, bench, demo, image, lab, qemu};

#[derive(Parser)]
#[command(
    name = "enilab",
    version,
    about = "An AWS-style VPC of real QEMU VMs on one host"
)]
struct Cli {
    /// Where labs keep sockets and logs (also $ENILAB_RUN_DIR).
    #[arg(long, global = true)]
    run_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot two guests in one subnet, ping both ways, run iperf3, print a summary.
    Demo {
        /// iperf3 duration in seconds.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a guest, stream its output, exit with its code.
    Exec {
        /// Instance name.
        instance: String,
        /// Seconds before the command is killed (0: no limit).
        #[arg(long, default_value_t = 0)]
        timeout: u64,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Guest image operations.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Serve the EC2 Query API (version 2016-11-15) for boto3 and the AWS CLI.
    Serve {
        /// Address to listen on. On loopback no signature is checked
        /// (unless --require-auth); any other address needs --credentials.
        #[arg(long, default_value = "127.0.0.1:8990")]
        listen: std::net::SocketAddr,
        /// File of `ACCESS_KEY_ID SECRET_ACCESS_KEY` lines: every request
        /// must then carry a valid SigV4 signature made with one of them.
        #[arg(long)]
        credentials: Option<PathBuf>,
        /// Check signatures on loopback too (needs --credentials).
        #[arg(long)]
        require_auth: bool,
        /// Requests per second allowed per client address (token bucket).
        /// Default 100, for remote clients only; given, it applies to
        /// loopback clients too.
        #[arg(long)]
        rate_limit: Option<f64>,
        /// Requests a client may send at once after being idle.
        #[arg(long, default_value_t = 200)]
        rate_burst: u32,
        /// Where the state database and config.json live
        /// (default: <state dir>/api, see $ENILAB_STATE_DIR).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Elastic IP pool, a CIDR (default 203.0.113.0/24, TEST-NET-3).
        #[arg(long)]
        public_pool: Option<String>,
        /// What instances are: `qemu` boots real guests from the image;
        /// `record` only records state (no VMs, no datapath).
        #[arg(long, value_enum, default_value = "qemu")]
        driver: DriverKind,
        /// Force the accelerator (default: KVM if a probe boot works, else TCG).
        #[arg(long, value_enum)]
        accel: Option<AccelArg>,
        /// Do not create the internet namespace behind the uplink.
        #[arg(long)]
        no_internet: bool,
        /// Datapath worker threads per network card.
        #[arg(long, default_value_t = 1)]
        workers_per_card: usize,
        /// Hyperplane nodes (threads) serving NAT gateways and load
        /// balancers; 0 runs none.
        #[arg(long, default_value_t = 2)]
        hyperplane_nodes: usize,
    },
    /// Datapath benchmark side by side with DPDK's vhost PMD: testpmd's
    /// virtio-user ports as synthetic guests on one core, the backend on
    /// the other; prints Mpps per backend and the ratio enilab/DPDK.
    Bench {
        /// The anchor backend (only `dpdk`).
        #[arg(long, value_enum, default_value = "dpdk")]
        against: BenchAgainst,
        /// `fwd` (port-to-port loop), `rxonly` (txonly source into the
        /// backend) or `iperf` (two TCG guests).
        #[arg(long, value_enum, default_value = "fwd")]
        scenario: BenchScenario,
        /// Frame sizes in bytes.
        #[arg(long, value_delimiter = ',', default_value = "64,1500")]
        sizes: Vec<u32>,
        /// Queue pairs per port.
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        queues: Vec<u16>,
        /// Measured window per run, after a 2 s warm-up.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Bursts the frontend sends first in `fwd` (frames in the loop).
        #[arg(long, default_value_t = 4)]
        bursts: u32,
        /// enilab's busy-poll budget in microseconds (0: sleep in epoll
        /// between guest kicks).
        #[arg(long, default_value_t = 1000)]
        busy_poll_us: u64,
        /// Only run enilab's side (no DPDK anchor, no ratio).
        #[arg(long)]
        enilab_only: bool,
        /// Runs per size and queue count (DPDK and enilab alternating);
        /// the table shows the medians.
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        /// Print JSON rows instead of the table.
        #[arg(long)]
        json: bool,
        /// Do not raise testpmd and the backend to SCHED_RR (by default
        /// they are, when permitted, so other load on the host cannot
        /// starve either side of the comparison).
        #[arg(long)]
        no_realtime: bool,
    },
    /// Measure API calls per second against a running `enilab serve`.
    BenchApi {
        /// The daemon's address.
        #[arg(long, default_value = "127.0.0.1:8990")]
        endpoint: std::net::SocketAddr,
        /// Seconds per measured action.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Parallel connections.
        #[arg(long, default_value_t = 4)]
        connections: usize,
    },
    /// ENI failover groups and moves (enilab actions on the daemon's
    /// endpoint).
    Failover {
        /// The daemon's address.
        #[arg(long, default_value = "127.0.0.1:8990")]
        endpoint: std::net::SocketAddr,
        #[command(subcommand)]
        cmd: FailoverCmd,
    },
    /// Restart the datapath's worker group of one card (or all) under
    /// running guests; QEMU reconnects by itself.
    RestartBackend {
        /// The daemon's address.
        #[arg(long, default_value = "127.0.0.1:8990")]
        endpoint: std::net::SocketAddr,
        /// Only this network card.
        #[arg(long)]
        card: Option<u32>,
    },
    /// Show the lab as tables: instances, network interfaces (device and
    /// card index, switch port, counters), network cards and subnets, from
    /// a running `enilab serve`; without one, the guests under the run dir.
    #[command(alias = "ls")]
    Status {
        /// The daemon's address.
        #[arg(long, default_value = "127.0.0.1:8990")]
        endpoint: std::net::SocketAddr,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Write a pcap of what an ENI sends and receives (Wireshark, tshark),
    /// until Ctrl-C, --count or --seconds.
    Capture {
        /// The network interface (eni-…).
        eni: String,
        /// Output file, `-` for stdout (e.g. `| tshark -r -`).
        #[arg(short = 'w', long = "write")]
        write: PathBuf,
        /// Stop after this many frames.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        seconds: Option<u64>,
        /// The daemon's address.
        #[arg(long, default_value = "127.0.0.1:8990")]
        endpoint: std::net::SocketAddr,
    },
    /// Draw the lab (VPCs, subnets, instances, ENIs with device and card
    /// index, gateways, load balancers) with traffic rates, as SVG or PNG
    /// through Graphviz (`.dot` output, or when `dot` is missing: the
    /// source).
    Graph {
        /// Output file (`.svg`, `.png`, `.dot`); `-` for SVG on stdout.
        #[arg(short = 'o', long = "output", default_value = "-")]
        output: PathBuf,
        /// Seconds between the two samples the rates come from.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// The daemon's address.
        #[arg(long, default_value = "127.0.0.1:8990")]
        endpoint: std::net::SocketAddr,
    },
    /// Create what a topology file (TOML) describes through the daemon's
    /// API; resources already there (tag enilab:name) are left alone.
    Up {
        file: PathBuf,
        /// The daemon's address.
        #[arg(long, default_value = "127.0.0.1:8990")]
        endpoint: std::net::SocketAddr,
        /// Print the changes as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete what `enilab up FILE` created.
    Down {
        file: PathBuf,
        /// The daemon's address.
        #[arg(long, default_value = "127.0.0.1:8990")]
        endpoint: std::net::SocketAddr,
        /// Print the changes as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum FailoverCmd {
    /// Create a group: the ENI moves to the first healthy standby when its
    /// instance fails.
    Create {
        #[arg(long)]
        eni: String,
        /// Standby instances, in order of preference.
        #[arg(long = "standby", required = true)]
        standbys: Vec<String>,
    },
    /// List the groups.
    #[command(alias = "ls")]
    Describe,
    /// Delete a group (the ENI stays where it is).
    Delete { group: String },
    /// Move an ENI now (to these instances, else to its group's standbys).
    Move {
        #[arg(long)]
        eni: String,
        #[arg(long = "to")]
        to: Vec<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchAgainst {
    Dpdk,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchScenario {
    Fwd,
    Rxonly,
    Iperf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DriverKind {
    Qemu,
    Record,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum AccelArg {
    Kvm,
    Tcg,
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build (or verify the cache of) the guest kernel and initramfs.
    Build {
        #[arg(long)]
        force: bool,
    },
    /// Print where the image is.
    Show,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENILAB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("enilab: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let run_root = cli.run_dir.unwrap_or_else(lab::default_run_root);
    match cli.cmd {
        Cmd::Demo { seconds, json } => {
            let mut opts = demo::DemoOptions::default();
            opts.lab.run_root = run_root;
            opts.iperf_seconds = seconds.clamp(1, 60);
            // A spinner on a terminal (each step stays printed above it);
            // plain lines otherwise.
            let bar = indicatif::ProgressBar::new_spinner();
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(120));
            let report = demo::run(opts, &|m| {
                if bar.is_hidden() {
                    eprintln!("demo: {m}");
                } else {
                    bar.println(format!("demo: {m}"));
                    bar.set_message(m.to_string());
                }
            });
            bar.finish_and_clear();
            let report = report?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", demo::render(&report));
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Exec {
            instance,
            timeout,
            argv,
        } => {
            let sock = lab::instance_dir(&run_root, &instance).join("agent.sock");
            let mut client =
                AgentClient::connect(&sock).with_context(|| format!("instance {instance}"))?;
            let t = (timeout > 0).then(|| Duration::from_secs(timeout));
            use std::io::Write;
            let status = client.exec(&argv, None, t, |stream, data| {
                let _ = match stream {
                    Stream::Stdout => std::io::stdout().write_all(data),
                    Stream::Stderr => std::io::stderr().write_all(data),
                };
            })?;
            let _ = std::io::stdout().flush();
            Ok(ExitCode::from(status.code.clamp(0, 255) as u8))
        }
        Cmd::Serve {
            listen,
            credentials,
            require_auth,
            rate_limit,
            rate_burst,
            state_dir,
            public_pool,
            driver,
            accel,
            no_internet,
            workers_per_card,
            hyperplane_nodes,
        } => {
            let dir = state_dir.unwrap_or_else(|| qemu::default_state_dir().join("api"));
            let mut config = api::Config::load(&dir)?;
            if let Some(p) = public_pool {
                config.set_pool(&p)?;
            }
            let rate = rate_limit.unwrap_or(api::access::RateLimit::default().rate);
            if !(rate > 0.0 && rate.is_finite()) || rate_burst == 0 {
                anyhow::bail!("--rate-limit and --rate-burst must be positive");
            }
            let creds = credentials
                .as_deref()
                .map(api::access::Credentials::load)
                .transpose()?;
            let mut access = api::access::Access::for_listen(
                listen,
                creds,
                require_auth,
                api::access::RateLimit {
                    rate,
                    burst: rate_burst,
                },
            )?;
            access.limit_loopback = rate_limit.is_some();
            config.access = std::sync::Arc::new(access);
            match driver {
                DriverKind::Record => {
                    api::http::run_daemon(
                        listen,
                        &dir,
                        config,
                        std::sync::Arc::new(api::RecordingDriver),
                    )?;
                }
                DriverKind::Qemu => {
                    let vms = std::sync::Arc::new(
                        api::qemu_driver::QemuDriver::new(api::qemu_driver::QemuDriverOptions {
                            run_root,
                            config: config.clone(),
                            workers_per_card,
                            accel: accel.map(|a| match a {
                                AccelArg::Kvm => qemu::Accel::Kvm,
                                AccelArg::Tcg => qemu::Accel::Tcg,
                            }),
                            internet: !no_internet,
                            metadata: true,
                            hyperplane_nodes,
                            image: None,
                        })
                        .context("cannot start the QEMU driver (use --driver record to serve without VMs)")?,
                    );
                    eprintln!(
                        "enilab: guests use {} ({})",
                        vms.accel().accel,
                        vms.accel().reason
                    );
                    let res = api::http::run_daemon(listen, &dir, config, vms.clone());
                    // Guests outlive the daemon; the next one adopts them.
                    vms.release();
                    res?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench {
            against: BenchAgainst::Dpdk,
            scenario,
            sizes,
            queues,
            seconds,
            bursts,
            busy_poll_us,
            enilab_only,
            repeat,
            json,
            no_realtime,
        } => {
            let opts = bench::BenchOptions {
                scenario: match scenario {
                    BenchScenario::Fwd => bench::Scenario::Fwd,
                    BenchScenario::Rxonly => bench::Scenario::Rxonly,
                    BenchScenario::Iperf => bench::Scenario::Iperf,
                },
                sizes,
                queues,
                seconds: seconds.clamp(1, 600),
                bursts: bursts.clamp(1, 64),
                busy_poll: Duration::from_micros(busy_poll_us.min(1_000_000)),
                enilab_only,
                repeat: repeat.clamp(1, 20),
                realtime: !no_realtime,
                run_root,
                ..Default::default()
            };
            let rows = bench::run(&opts, &|m| eprintln!("bench: {m}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", bench::render(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::BenchApi {
            endpoint,
            seconds,
            connections,
        } => {
            let report = api::bench::run(endpoint, Duration::from_secs(seconds), connections)?;
            print!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Image { cmd } => match cmd {
            ImageCmd::Build { force } => {
                let img = image::Image::build(force)?;
                println!(
                    "kernel {}\ninitrd {}",
                    img.kernel.display(),
                    img.initrd.display()
                );
                Ok(ExitCode::SUCCESS)
            }
            ImageCmd::Show => {
                let img = image::Image::locate()?;
                println!(
                    "kernel {}\ninitrd {}",
                    img.kernel.display(),
                    img.initrd.display()
                );
                Ok(ExitCode::SUCCESS)
            }
        },
        Cmd::Failover { endpoint, cmd } => {
            let mut params: Vec<(String, String)> = Vec::new();
            let action = match cmd {
                FailoverCmd::Create { eni, standbys } => {
                    params.push(("NetworkInterfaceId".into(), eni));
                    for (i, s) in standbys.into_iter().enumerate() {
                        params.push((format!("StandbyInstanceId.{}", i + 1), s));
                    }
                    "CreateFailoverGroup"
                }
                FailoverCmd::Describe => "DescribeFailoverGroups",
                FailoverCmd::Delete { group } => {
                    params.push(("FailoverGroupId".into(), group));
                    "DeleteFailoverGroup"
                }
                FailoverCmd::Move { eni, to } => {
                    params.push(("NetworkInterfaceId".into(), eni));
                    for (i, s) in to.into_iter().enumerate() {
                        params.push((format!("InstanceId.{}", i + 1), s));
                    }
                    "FailoverNetworkInterface"
                }
            };
            let mut body = format!("Action={action}&Version=2016-11-15");
            for (k, v) in &params {
                // IDs and names only: nothing to escape.
                body.push_str(&format!("&{k}={v}"));
            }
            let mut c = api::bench::Client::connect(endpoint)?;
            let (status, xml) = c.post(&body)?;
            println!("{xml}");
            Ok(if status == 200 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::RestartBackend { endpoint, card } => {
            let path = match card {
                Some(c) => format!("{}?card={c}", api::failover::BACKEND_RESTART_PATH),
                None => api::failover::BACKEND_RESTART_PATH.to_string(),
            };
            let (status, v) = api::failover::post_live(endpoint, &path)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(if status == 200 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Capture {
            eni,
            write,
            count,
            seconds,
            endpoint,
        } => {
            let req = api::capture::CaptureRequest {
                eni,
                count,
                seconds,
            };
            api::capture::stop_on_sigint();
            let frames = if write.as_os_str() == "-" {
                api::capture::fetch(endpoint, &req, &mut std::io::stdout().lock())?
            } else {
                let mut f = std::fs::File::create(&write)
                    .with_context(|| format!("cannot create {}", write.display()))?;
                api::capture::fetch(endpoint, &req, &mut f)?
            };
            eprintln!("enilab: {frames} frames captured from {}", req.eni);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Graph {
            output,
            interval,
            endpoint,
        } => {
            use enilab_control::graph;
            let before = api::status::fetch(endpoint)?;
            let t0 = std::time::Instant::now();
            std::thread::sleep(Duration::from_secs_f64(interval.clamp(0.0, 60.0)));
            let after = api::status::fetch(endpoint)?;
            let rates = graph::rates(&before, &after, t0.elapsed().as_secs_f64());
            let dot = graph::to_dot(&after, &rates);
            let stdout = output.as_os_str() == "-";
            let format = if stdout {
                "svg"
            } else {
                graph::format_of(&output)
            };
            let (bytes, path) = if format == "dot" {
                (dot.into_bytes(), output)
            } else {
                match graph::render(&dot, format) {
                    Ok(b) => (b, output),
                    Err(graph::GraphError::NoDot(e)) => {
                        let path = if stdout {
                            output
                        } else {
                            output.with_extension("dot")
                        };
                        eprintln!(
                            "enilab: graphviz `dot` is missing ({e}); writing the dot source instead (apt-get install graphviz)"
                        );
                        (dot.into_bytes(), path)
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            if path.as_os_str() == "-" {
                use std::io::Write;
                std::io::stdout().write_all(&bytes)?;
            } else {
                std::fs::write(&path, &bytes)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                eprintln!("enilab: wrote {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Up {
            file,
            endpoint,
            json,
        } => {
            use enilab_control::topology::{apply, Topology};
            let t = Topology::load(&file)?;
            let bars = indicatif::MultiProgress::new();
            let style = indicatif::ProgressStyle::with_template(
                "{spinner} {prefix:.bold} {msg} ({elapsed})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
            let shown = std::cell::RefCell::new(std::collections::BTreeMap::new());
            let progress = |name: &str, id: &str, state: &str, done: bool| {
                let mut shown = shown.borrow_mut();
                let bar = shown.entry(id.to_string()).or_insert_with(|| {
                    let b = bars.add(indicatif::ProgressBar::new_spinner());
                    b.set_style(style.clone());
                    b.set_prefix(format!("{name} {id}"));
                    b.enable_steady_tick(Duration::from_millis(120));
                    b
                });
                if done {
                    bar.finish_with_message(state.to_string());
                } else {
                    bar.set_message(format!("{state}, booting"));
                }
            };
            let report = apply::up(endpoint, &t, &progress)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", apply::render(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Down {
            file,
            endpoint,
            json,
        } => {
            use enilab_control::topology::{apply, Topology};
            let t = Topology::load(&file)?;
            let report = apply::down(endpoint, &t)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", apply::render(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { endpoint, json } => {
            match api::status::fetch(endpoint) {
                Ok(v) if json => {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                    return Ok(ExitCode::SUCCESS);
                }
                Ok(v) => {
                    print!("{}", api::status::render(&v));
                    return Ok(ExitCode::SUCCESS);
                }
                Err(e) => eprintln!(
                    "enilab: {e}; listing the guests under {}",
                    run_root.display()
                ),
            }
            let dir = run_root.join("instances");
            let mut rows = Vec::new();
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().to_string();
                    let alive = AgentClient::connect(e.path().join("agent.sock")).is_ok();
                    rows.push((name, alive));
                }
            }
            rows.sort();
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(n, a)| serde_json::json!({"instance": n, "agent": a}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<32} AGENT", "INSTANCE");
                for (n, a) in rows {
                    println!("{:<32} {}", n, if a { "up" } else { "down" });
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
