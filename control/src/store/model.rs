//! The resources the API manages, as they are stored.
//!
//! Every top-level resource is keyed by its AWS ID; IDs carry their type in
//! the prefix (`vpc-`, `subnet-`, ...), so one ordered map holds them all and
//! a prefix range lists one type. Sub-objects that have IDs of their own
//! (attachments, associations) live inside their parent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub type Tags = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vpc {
    pub id: String,
    pub cidr: String,
    pub cidr_assoc_id: String,
    pub tenancy: String,
    pub main_route_table: String,
    pub default_acl: String,
    pub default_sg: String,
    pub tags: Tags,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subnet {
    pub id: String,
    pub vpc_id: String,
    pub cidr: String,
    pub az: String,
    pub map_public_ip_on_launch: bool,
    pub tags: Tags,
}

/// One atomic security group rule: a protocol/port range and one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SgRule {
    /// "tcp", "udp", "icmp", "-1" or a protocol number.
    pub protocol: String,
    pub from_port: Option<i32>,
    pub to_port: Option<i32>,
    pub peer: SgPeer,
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SgPeer {
    Cidr(String),
    Group(String),
}

impl SgRule {
    /// Two rules are duplicates when everything but the description matches.
    pub fn same_as(&self, o: &SgRule) -> bool {
        self.protocol == o.protocol
            && self.from_port == o.from_port
            && self.to_port == o.to_port
            && self.peer == o.peer
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecurityGroup {
    pub id: String,
    pub name: String,
    pub description: String,
    pub vpc_id: String,
    pub ingress: Vec<SgRule>,
    pub egress: Vec<SgRule>,
    pub tags: Tags,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteTarget {
    Local,
    Gateway(String),
    NatGateway(String),
    NetworkInterface(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub destination: String,
    pub target: RouteTarget,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RtbAssociation {
    pub id: String,
    /// None for the main association.
    pub subnet_id: Option<String>,
    pub main: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteTable {
    pub id: String,
    pub vpc_id: String,
    /// Routes other than the implied local one.
    pub routes: Vec<Route>,
    pub associations: Vec<RtbAssociation>,
    pub tags: Tags,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InternetGateway {
    pub id: String,
    pub vpc_id: Option<String>,
    pub tags: Tags,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AclEntry {
    pub rule_number: u16,
    pub egress: bool,
    /// "-1" or a protocol number.
    pub protocol: String,
    pub allow: bool,
    pub cidr: String,
    pub icmp: Option<(i32, i32)>,
    pub ports: Option<(i32, i32)>,
}

/// The rule number AWS shows as `*`: the final deny.
pub const ACL_DEFAULT_RULE: u16 = 32767;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AclAssociation {
    pub id: String,
    pub subnet_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkAcl {
    pub id: String,
    pub vpc_id: String,
    pub default: bool,
    pub entries: Vec<AclEntry>,
    pub associations: Vec<AclAssociation>,
    pub tags: Tags,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttachmentStatus {
    Attaching,
    Attached,
    Detaching,
    Detached,
}

impl AttachmentStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            AttachmentStatus::Attaching => "attaching",
            AttachmentStatus::Attached => "attached",
            AttachmentStatus::Detaching => "detaching",
            AttachmentStatus::Detached => "detached",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    pub id: String,
    pub instance_id: String,
    pub device_index: u32,
    pub card_index: u32,
    pub status: AttachmentStatus,
    /// Milliseconds since the epoch.
    pub attach_time: u64,
    pub delete_on_termination: bool,
    pub ena_queue_count: Option<u32>,
    /// A detach asked for Force.
    #[serde(default)]
    pub force_detach: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivateIp {
    pub ip: String,
    pub primary: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Eni {
    pub id: String,
    pub subnet_id: String,
    pub vpc_id: String,
    pub az: String,
    pub description: String,
    pub mac: String,
    /// The primary address first.
    pub private_ips: Vec<PrivateIp>,
    /// Delegated /28 prefixes.
    pub prefixes: Vec<String>,
    pub groups: Vec<String>,
    pub source_dest_check: bool,
    pub attachment: Option<Attachment>,
    pub tags: Tags,
    /// The public IPv4 address auto-assigned to the primary interface at
    /// launch or start (from the public pool; not an Elastic IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<String>,
    /// Launched with a public IPv4 address: the interface gets a new one
    /// whenever its instance starts (see `api::pubip`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_public_ip: bool,
}

impl Eni {
    pub fn primary_ip(&self) -> &str {
        self.private_ips
            .iter()
            .find(|p| p.primary)
            .or(self.private_ips.first())
            .map(|p| p.ip.as_str())
            .unwrap_or("")
    }

    pub fn has_ip(&self, ip: &str) -> bool {
        self.private_ips.iter().any(|p| p.ip == ip)
    }

    /// Addresses and prefixes as AWS counts them against the per-ENI limit.
    pub fn ipv4_count(&self) -> usize {
        self.private_ips.len() + self.prefixes.len()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    Pending,
    Running,
    ShuttingDown,
    Terminated,
    Stopping,
    Stopped,
}

impl InstanceState {
    pub fn name(&self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::ShuttingDown => "shutting-down",
            InstanceState::Terminated => "terminated",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
        }
    }

    /// EC2's state code.
    pub fn code(&self) -> u32 {
        match self {
            InstanceState::Pending => 0,
            InstanceState::Running => 16,
            InstanceState::ShuttingDown => 32,
            InstanceState::Terminated => 48,
            InstanceState::Stopping => 64,
            InstanceState::Stopped => 80,
        }
    }

    pub fn gone(&self) -> bool {
        matches!(
            self,
            InstanceState::ShuttingDown | InstanceState::Terminated
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub reservation_id: String,
    pub image_id: String,
    pub instance_type: String,
    pub state: InstanceState,
    pub state_reason: Option<(String, String)>,
    pub transition_reason: String,
    pub subnet_id: String,
    pub vpc_id: String,
    pub az: String,
    pub launch_time: u64,
    pub launch_index: u32,
    pub key_name: Option<String>,
    pub client_token: Option<String>,
    pub user_data: Option<String>,
    pub tags: Tags,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EipAssociation {
    pub id: String,
    pub eni_id: String,
    pub private_ip: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Address {
    pub id: String,
    pub public_ip: String,
    pub association: Option<EipAssociation>,
    pub tags: Tags,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowLog {
    pub id: String,
    pub resource_id: String,
    pub traffic_type: String,
    pub destination_type: String,
    pub destination: String,
    pub max_aggregation_interval: u32,
    pub log_format: String,
    pub creation_time: u64,
    pub tags: Tags,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NatState {
    Pending,
    Available,
    Deleting,
    Deleted,
    Failed,
}

impl NatState {
    pub fn as_str(&self) -> &'static str {
        match self {
            NatState::Pending => "pending",
            NatState::Available => "available",
            NatState::Deleting => "deleting",
            NatState::Deleted => "deleted",
            NatState::Failed => "failed",
        }
    }

    /// Deleting, deleted or failed: holds no interface and no address.
    pub fn gone(&self) -> bool {
        matches!(
            self,
            NatState::Deleting | NatState::Deleted | NatState::Failed
        )
    }
}

/// One address of a NAT gateway: a private IP of its interface and, for a
/// public gateway, the Elastic IP associated with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NatAddress {
    pub allocation_id: Option<String>,
    pub public_ip: Option<String>,
    pub association_id: Option<String>,
    pub private_ip: String,
    pub is_primary: bool,
}

/// A NAT gateway. Its requester-managed interface (`eni_id`) exists while
/// it is pending or available; `addresses` keeps the last addresses after
/// deletion (AWS shows them on deleted gateways too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NatGateway {
    pub id: String,
    pub vpc_id: String,
    pub subnet_id: String,
    pub eni_id: String,
    /// "public" or "private".
    pub connectivity: String,
    pub addresses: Vec<NatAddress>,
    pub state: NatState,
    pub create_time: u64,
    pub delete_time: Option<u64>,
    pub client_token: Option<String>,
    pub tags: Tags,
}

impl NatGateway {
    pub fn primary(&self) -> Option<&NatAddress> {
        self.addresses.iter().find(|a| a.is_primary)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LbState {
    Provisioning,
    Active,
    Failed,
}

impl LbState {
    pub fn as_str(&self) -> &'static str {
        match self {
            LbState::Provisioning => "provisioning",
            LbState::Active => "active",
            LbState::Failed => "failed",
        }
    }
}

/// A load balancer's presence in one subnet: its requester-managed
/// interface, whose primary private IP is the VIP there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LbNode {
    pub subnet_id: String,
    pub az: String,
    pub eni_id: String,
    pub private_ip: String,
    /// The Elastic IP of an internet-facing load balancer's SubnetMapping.
    pub allocation_id: Option<String>,
    pub public_ip: Option<String>,
}

/// An ELBv2 network load balancer. `id` is the ARN's resource part
/// (`loadbalancer/net/<name>/<16 hex>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadBalancer {
    pub id: String,
    pub name: String,
    /// "internal" or "internet-facing".
    pub scheme: String,
    pub vpc_id: String,
    pub state: LbState,
    pub created: u64,
    pub dns_name: String,
    pub nodes: Vec<LbNode>,
    pub tags: Tags,
}

/// Health check settings of a target group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub enabled: bool,
    /// "TCP", "HTTP" or "HTTPS".
    pub protocol: String,
    /// "traffic-port" or a port number.
    pub port: String,
    pub path: Option<String>,
    pub interval_s: u32,
    pub timeout_s: u32,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

/// A registered target. `id` is an instance ID or an IPv4 address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub id: String,
    pub port: u16,
    pub az: Option<String>,
    /// Deregistered at this time (ms): draining until the deregistration
    /// delay has passed, then removed.
    pub draining_since: Option<u64>,
}

/// An ELBv2 target group (`targetgroup/<name>/<16 hex>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetGroup {
    pub id: String,
    pub name: String,
    /// "TCP", "UDP" or "TCP_UDP".
    pub protocol: String,
    pub port: u16,
    pub vpc_id: String,
    /// "instance" or "ip".
    pub target_type: String,
    pub health_check: HealthCheck,
    /// Every attribute with its current value (defaults filled in).
    pub attributes: BTreeMap<String, String>,
    pub targets: Vec<Target>,
    pub tags: Tags,
}

impl TargetGroup {
    /// `deregistration_delay.timeout_seconds`.
    pub fn deregistration_delay_s(&self) -> u32 {
        self.attributes
            .get("deregistration_delay.timeout_seconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(300)
    }

    /// Source-IP stickiness on (`stickiness.enabled` with type `source_ip`).
    pub fn sticky_source_ip(&self) -> bool {
        self.attributes
            .get("stickiness.enabled")
            .map(|s| s.as_str())
            == Some("true")
            && self.attributes.get("stickiness.type").map(|s| s.as_str()) == Some("source_ip")
    }
}

/// An ELBv2 listener (`listener/net/<lb name>/<lb hex>/<16 hex>`) that
/// forwards to one target group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Listener {
    pub id: String,
    pub lb_id: String,
    /// "TCP", "UDP" or "TCP_UDP".
    pub protocol: String,
    pub port: u16,
    pub target_group: String,
    pub tags: Tags,
}

/// Every stored resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Resource {
    Vpc(Vpc),
    Subnet(Subnet),
    SecurityGroup(SecurityGroup),
    RouteTable(RouteTable),
    InternetGateway(InternetGateway),
    NetworkAcl(NetworkAcl),
    Eni(Eni),
    Instance(Instance),
    Address(Address),
    FlowLog(FlowLog),
    NatGateway(NatGateway),
    LoadBalancer(LoadBalancer),
    TargetGroup(TargetGroup),
    Listener(Listener),
    FailoverGroup(FailoverGroup),
}

/// A stored type: its ID prefix and how to get it out of a [`Resource`].
pub trait Kind: Sized + Clone + Into<Resource> + 'static {
    const PREFIX: &'static str;
    fn from_ref(r: &Resource) -> Option<&Self>;
    fn id(&self) -> &str;
    fn tags(&self) -> &Tags;
    fn tags_mut(&mut self) -> &mut Tags;
}

macro_rules! kind {
    ($t:ident, $prefix:literal) => {
        impl Kind for $t {
            const PREFIX: &'static str = $prefix;
            fn from_ref(r: &Resource) -> Option<&Self> {
                match r {
                    Resource::$t(x) => Some(x),
                    _ => None,
                }
            }
            fn id(&self) -> &str {
                &self.id
            }
            fn tags(&self) -> &Tags {
                &self.tags
            }
            fn tags_mut(&mut self) -> &mut Tags {
                &mut self.tags
            }
        }
        impl From<$t> for Resource {
            fn from(x: $t) -> Resource {
                Resource::$t(x)
            }
        }
    };
}

kind!(Vpc, "vpc-");
kind!(Subnet, "subnet-");
kind!(SecurityGroup, "sg-");
kind!(RouteTable, "rtb-");
kind!(InternetGateway, "igw-");
kind!(NetworkAcl, "acl-");
kind!(Eni, "eni-");
kind!(Instance, "i-");
kind!(Address, "eipalloc-");
kind!(FlowLog, "fl-");
kind!(NatGateway, "nat-");
// ELBv2 resources are keyed by the resource part of their ARN.
kind!(LoadBalancer, "loadbalancer/");
kind!(TargetGroup, "targetgroup/");
kind!(Listener, "listener/");

impl Resource {
    pub fn id(&self) -> &str {
        match self {
            Resource::Vpc(x) => &x.id,
            Resource::Subnet(x) => &x.id,
            Resource::SecurityGroup(x) => &x.id,
            Resource::RouteTable(x) => &x.id,
            Resource::InternetGateway(x) => &x.id,
            Resource::NetworkAcl(x) => &x.id,
            Resource::Eni(x) => &x.id,
            Resource::Instance(x) => &x.id,
            Resource::Address(x) => &x.id,
            Resource::FlowLog(x) => &x.id,
            Resource::NatGateway(x) => &x.id,
            Resource::LoadBalancer(x) => &x.id,
            Resource::TargetGroup(x) => &x.id,
            Resource::Listener(x) => &x.id,
            Resource::FailoverGroup(x) => &x.id,
        }
    }

    pub fn tags_mut(&mut self) -> &mut Tags {
        match self {
            Resource::Vpc(x) => &mut x.tags,
            Resource::Subnet(x) => &mut x.tags,
            Resource::SecurityGroup(x) => &mut x.tags,
            Resource::RouteTable(x) => &mut x.tags,
            Resource::InternetGateway(x) => &mut x.tags,
            Resource::NetworkAcl(x) => &mut x.tags,
            Resource::Eni(x) => &mut x.tags,
            Resource::Instance(x) => &mut x.tags,
            Resource::Address(x) => &mut x.tags,
            Resource::FlowLog(x) => &mut x.tags,
            Resource::NatGateway(x) => &mut x.tags,
            Resource::LoadBalancer(x) => &mut x.tags,
            Resource::TargetGroup(x) => &mut x.tags,
            Resource::Listener(x) => &mut x.tags,
            Resource::FailoverGroup(x) => &mut x.tags,
        }
    }

    pub fn tags(&self) -> &Tags {
        match self {
            Resource::Vpc(x) => &x.tags,
            Resource::Subnet(x) => &x.tags,
            Resource::SecurityGroup(x) => &x.tags,
            Resource::RouteTable(x) => &x.tags,
            Resource::InternetGateway(x) => &x.tags,
            Resource::NetworkAcl(x) => &x.tags,
            Resource::Eni(x) => &x.tags,
            Resource::Instance(x) => &x.tags,
            Resource::Address(x) => &x.tags,
            Resource::FlowLog(x) => &x.tags,
            Resource::NatGateway(x) => &x.tags,
            Resource::LoadBalancer(x) => &x.tags,
            Resource::TargetGroup(x) => &x.tags,
            Resource::Listener(x) => &x.tags,
            Resource::FailoverGroup(x) => &x.tags,
        }
    }

    /// The `ResourceType` name used by TagSpecification and DescribeTags.
    pub fn type_name(&self) -> &'static str {
        match self {
            Resource::Vpc(_) => "vpc",
            Resource::Subnet(_) => "subnet",
            Resource::SecurityGroup(_) => "security-group",
            Resource::RouteTable(_) => "route-table",
            Resource::InternetGateway(_) => "internet-gateway",
            Resource::NetworkAcl(_) => "network-acl",
            Resource::Eni(_) => "network-interface",
            Resource::Instance(_) => "instance",
            Resource::Address(_) => "elastic-ip",
            Resource::FlowLog(_) => "vpc-flow-log",
            Resource::NatGateway(_) => "natgateway",
            Resource::LoadBalancer(_) => "loadbalancer",
            Resource::TargetGroup(_) => "targetgroup",
            Resource::Listener(_) => "listener",
            Resource::FailoverGroup(_) => "failover-group",
        }
    }

    /// An EC2 resource (EC2's DescribeTags lists it), not an ELBv2 one.
    pub fn is_ec2(&self) -> bool {
        !matches!(
            self,
            Resource::LoadBalancer(_) | Resource::TargetGroup(_) | Resource::Listener(_)
        )
    }
}

// ---- Failover groups (enilab, not EC2) ----

/// An ENI and the ordered standby instances it moves to when the instance
/// holding it fails (`control/src/api/failover.rs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailoverGroup {
    pub id: String,
    pub eni_id: String,
    pub standbys: Vec<String>,
    pub creation_time: u64,
    /// Completed moves.
    pub failovers: u32,
    /// The last thing the detector did or could not do.
    #[serde(default)]
    pub last_event: Option<String>,
    #[serde(default)]
    pub last_event_time: u64,
    pub tags: Tags,
}

kind!(FailoverGroup, "efg-");
