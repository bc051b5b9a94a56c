//! The EC2-compatible API daemon (`enilab serve`): the EC2 Query protocol,
//! version 2016-11-15, over HTTP on loopback.
//!
//! * [`http`]: the hyper server, body limit, request to [`Params`].
//! * [`query`]: form decoding; [`xml`]: the response writer.
//! * One file per resource family: [`vpc`] (VPCs, subnets), [`sg`],
//!   [`route`] (route tables, internet gateways), [`acl`], [`eni`],
//!   [`address`] (Elastic IPs), [`flowlog`], [`instance`] (images,
//!   instances), [`tags`].
//! * [`natgw`]: NAT gateways; [`elb`]: ELBv2 network load balancers
//!   (version 2015-12-01 on the same endpoint, its own XML and errors).
//! * [`driver`]: the seam to the machines; [`jobs`] runs it after commits.
//!
//! See `docs/api.md` for the design note.

pub mod access;
pub mod acl;
pub mod address;
pub mod bench;
pub mod capture;
pub mod common;
pub mod config;
pub mod datapath;
pub mod driver;
pub mod elb;
pub mod eni;
pub mod failover;
pub mod flowlog;
pub mod http;
pub mod hyperplane;
pub mod instance;
pub mod jobs;
pub mod metrics;
pub mod natgw;
pub mod pubip;
pub mod qemu_driver;
pub mod query;
pub mod route;
pub mod sg;
pub mod status;
pub mod tags;
pub mod vpc;
pub mod xml;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::store::{ids, Store, StoreError};

pub use config::{Config, ConfigError, InstanceType};
pub use driver::{DriverError, Health, InstanceDriver, Job, RecordingDriver, TargetHealthRow};
pub use query::{Params, QueryError};

/// The API version we speak.
pub const API_VERSION: &str = "2016-11-15";

/// An API failure: EC2's error code and message, or an internal failure.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A client error with EC2's code (HTTP 400).
    #[error("{code}: {message}")]
    Client { code: String, message: String },
    /// The request body is not a well-formed query string.
    #[error("malformed query string")]
    Query(#[from] QueryError),
    /// The body is larger than the limit.
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    /// The store failed (HTTP 500).
    #[error("state store failure")]
    Store(#[from] StoreError),
    /// A broken invariant in our own state (HTTP 500).
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl ApiError {
    pub fn new(code: &str, message: impl Into<String>) -> ApiError {
        ApiError::Client {
            code: code.to_string(),
            message: message.into(),
        }
    }

    pub fn invalid(message: String) -> ApiError {
        ApiError::new("InvalidParameterValue", message)
    }

    pub fn combination(message: String) -> ApiError {
        ApiError::new("InvalidParameterCombination", message)
    }

    pub fn missing(name: &str) -> ApiError {
        ApiError::new(
            "MissingParameter",
            format!("The request must contain the parameter {name}"),
        )
    }

    pub fn internal(what: &'static str) -> ApiError {
        ApiError::Internal(what)
    }

    pub fn code(&self) -> &str {
        match self {
            ApiError::Client { code, .. } => code,
            ApiError::Query(_) => "MalformedQueryString",
            ApiError::TooLarge(_) => "RequestEntityTooLarge",
            ApiError::Store(_) | ApiError::Internal(_) => "InternalError",
        }
    }

    pub fn message(&self) -> String {
        match self {
            ApiError::Client { message, .. } => message.clone(),
            ApiError::Query(e) => format!("The query string is malformed: {e}."),
            ApiError::TooLarge(n) => format!("The request body is larger than {n} bytes."),
            ApiError::Store(e) => {
                let mut s = format!("An internal error has occurred: {e}");
                let mut src = std::error::Error::source(e);
                while let Some(c) = src {
                    s.push_str(&format!(": {c}"));
                    src = c.source();
                }
                s
            }
            ApiError::Internal(w) => format!("An internal error has occurred: {w}"),
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            ApiError::Client { .. } | ApiError::Query(_) => 400,
            ApiError::TooLarge(_) => 413,
            ApiError::Store(_) | ApiError::Internal(_) => 500,
        }
    }
}

type Handler = fn(&Api, &Params) -> Result<String, ApiError>;

/// Every action, by name.
pub const ACTIONS: &[(&str, Handler)] = &[
    // enilab's own: the hyperplane's nodes.
    (
        "DescribeHyperplaneNodes",
        hyperplane::describe_hyperplane_nodes,
    ),
    ("StopHyperplaneNode", hyperplane::stop_hyperplane_node),
    ("StartHyperplaneNode", hyperplane::start_hyperplane_node),
    ("CreateVpc", vpc::create_vpc),
    ("DeleteVpc", vpc::delete_vpc),
    ("DescribeVpcs", vpc::describe_vpcs),
    ("CreateSubnet", vpc::create_subnet),
    ("DeleteSubnet", vpc::delete_subnet),
    ("DescribeSubnets", vpc::describe_subnets),
    ("ModifySubnetAttribute", vpc::modify_subnet_attribute),
    ("CreateSecurityGroup", sg::create_security_group),
    ("DeleteSecurityGroup", sg::delete_security_group),
    ("DescribeSecurityGroups", sg::describe_security_groups),
    ("AuthorizeSecurityGroupIngress", sg::authorize_ingress),
    ("AuthorizeSecurityGroupEgress", sg::authorize_egress),
    ("RevokeSecurityGroupIngress", sg::revoke_ingress),
    ("RevokeSecurityGroupEgress", sg::revoke_egress),
    ("CreateRouteTable", route::create_route_table),
    ("DeleteRouteTable", route::delete_route_table),
    ("CreateRoute", route::create_route),
    ("DeleteRoute", route::delete_route),
    ("AssociateRouteTable", route::associate_route_table),
    ("DisassociateRouteTable", route::disassociate_route_table),
    ("DescribeRouteTables", route::describe_route_tables),
    ("CreateInternetGateway", route::create_internet_gateway),
    ("AttachInternetGateway", route::attach_internet_gateway),
    ("DetachInternetGateway", route::detach_internet_gateway),
    ("DeleteInternetGateway", route::delete_internet_gateway),
    (
        "DescribeInternetGateways",
        route::describe_internet_gateways,
    ),
    ("CreateNetworkAcl", acl::create_network_acl),
    ("DeleteNetworkAcl", acl::delete_network_acl),
    ("CreateNetworkAclEntry", acl::create_network_acl_entry),
    ("ReplaceNetworkAclEntry", acl::replace_network_acl_entry),
    ("DeleteNetworkAclEntry", acl::delete_network_acl_entry),
    (
        "ReplaceNetworkAclAssociation",
        acl::replace_network_acl_association,
    ),
    ("DescribeNetworkAcls", acl::describe_network_acls),
    ("CreateNetworkInterface", eni::create_network_interface),
    ("DeleteNetworkInterface", eni::delete_network_interface),
    (
        "DescribeNetworkInterfaces",
        eni::describe_network_interfaces,
    ),
    ("AttachNetworkInterface", eni::attach_network_interface),
    ("DetachNetworkInterface", eni::detach_network_interface),
    (
        "ModifyNetworkInterfaceAttribute",
        eni::modify_network_interface_attribute,
    ),
    (
        "DescribeNetworkInterfaceAttribute",
        eni::describe_network_interface_attribute,
    ),
    ("AssignPrivateIpAddresses", eni::assign_private_ip_addresses),
    (
        "UnassignPrivateIpAddresses",
        eni::unassign_private_ip_addresses,
    ),
    ("AssignIpv6Addresses", eni::assign_ipv6_addresses),
    ("AllocateAddress", address::allocate_address),
    ("AssociateAddress", address::associate_address),
    ("DisassociateAddress", address::disassociate_address),
    ("ReleaseAddress", address::release_address),
    ("DescribeAddresses", address::describe_addresses),
    ("CreateFlowLogs", flowlog::create_flow_logs),
    ("DescribeFlowLogs", flowlog::describe_flow_logs),
    ("CreateNatGateway", natgw::create_nat_gateway),
    ("DeleteNatGateway", natgw::delete_nat_gateway),
    ("DescribeNatGateways", natgw::describe_nat_gateways),
    ("DeleteFlowLogs", flowlog::delete_flow_logs),
    ("DescribeImages", instance::describe_images),
    ("RunInstances", instance::run_instances),
    ("DescribeInstances", instance::describe_instances),
    ("DescribeInstanceStatus", instance::describe_instance_status),
    ("StopInstances", instance::stop_instances),
    ("StartInstances", instance::start_instances),
    ("TerminateInstances", instance::terminate_instances),
    ("CreateTags", tags::create_tags),
    ("DeleteTags", tags::delete_tags),
    ("DescribeTags", tags::describe_tags),
    // enilab's own actions (not EC2).
    ("CreateFailoverGroup", failover::create_failover_group),
    ("DescribeFailoverGroups", failover::describe_failover_groups),
    ("DeleteFailoverGroup", failover::delete_failover_group),
    (
        "FailoverNetworkInterface",
        failover::failover_network_interface,
    ),
];

/// The API: state, configuration, the driver and its job queue.
pub struct Api {
    pub store: Arc<Store>,
    pub config: Config,
    pub driver: Arc<dyn InstanceDriver>,
    pub jobs: jobs::JobQueue,
    /// Where the guest image is, when it is built.
    pub image_dir: Option<PathBuf>,
}

/// A finished response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Api {
    /// Open the state in `state_dir`, start the job workers, and re-queue
    /// what a previous run left in transitional states.
    pub fn open(
        state_dir: &Path,
        config: Config,
        driver: Arc<dyn InstanceDriver>,
    ) -> Result<Arc<Api>, ApiError> {
        let store = Arc::new(Store::open(state_dir)?);
        driver.on_open(&store);
        store.set_observer(Arc::new(driver::DriverObserver(driver.clone())));
        let jobs = jobs::JobQueue::start(store.clone(), driver.clone());
        let image_dir = crate::image::Image::locate().ok().map(|i| i.dir);
        let api = Arc::new(Api {
            store,
            config,
            driver,
            jobs,
            image_dir,
        });
        for job in jobs::recover(&api.store, api.driver.as_ref())? {
            api.jobs.push(job);
        }
        for (job, delay) in jobs::recover_delayed(&api.store) {
            api.jobs.push_after(job, delay);
        }
        // The datapath starts from the state as it is, adopted devices
        // included, before the first request.
        api.store.read(|st| api.driver.on_change(st));
        failover::Detector::start(&api);
        Ok(api)
    }

    /// Handle one decoded request.
    pub fn call(&self, params: &Params) -> Reply {
        let rid = ids::request_id();
        if params.get("Version") == Some(elb::VERSION) {
            return elb::call(self, params, &rid);
        }
        match self.dispatch(params) {
            Ok((action, body)) => Reply {
                status: 200,
                body: xml::response(action, &rid, &body),
            },
            Err(e) => {
                if e.status() >= 500 {
                    tracing::error!("request failed: {}", e.message());
                }
                Reply {
                    status: e.status(),
                    body: xml::error(e.code(), &e.message(), &rid),
                }
            }
        }
    }

    fn dispatch<'p>(&self, p: &'p Params) -> Result<(&'p str, String), ApiError> {
        let action = match p.get("Action") {
            Some(a) if !a.is_empty() => a,
            _ => {
                return Err(ApiError::new(
                    "MissingAction",
                    "The request must contain the parameter Action",
                ))
            }
        };
        match p.get("Version") {
            None | Some("") => return Err(ApiError::missing("Version")),
            Some(API_VERSION) => {}
            Some(v) => {
                return Err(ApiError::new(
                    "NoSuchVersion",
                    format!("The requested version ({v}) of service AmazonEC2 does not exist"),
                ))
            }
        }
        let handler = ACTIONS
            .iter()
            .find(|(n, _)| *n == action)
            .map(|(_, h)| *h)
            .ok_or_else(|| {
                ApiError::new(
                    "InvalidAction",
                    format!("The action {action} is not valid for this web service."),
                )
            })?;
        if common::opt_bool(p, "DryRun")? == Some(true) {
            return Err(ApiError::new(
                "DryRunOperation",
                "Request would have succeeded, but DryRun flag is set.",
            ));
        }
        handler(self, p).map(|b| (action, b))
    }
}
