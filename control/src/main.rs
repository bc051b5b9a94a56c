//! The `enilab` command: argument parsing that hands off to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use enilab_control::agent::{AgentClient, Stream};
use enilab_control::{api, demo, image, lab, qemu};

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
            let report = demo::run(opts, &|m| eprintln!("demo: {m}"))?;
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
