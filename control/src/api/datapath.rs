//! The API's desired state as the switch's [`Topology`].
//!
//! [`topology_of`] is a pure translation: it reads a [`State`] and returns a
//! `Topology` for `Snapshot::compile`; it does no I/O and keeps no state.
//! Choices:
//!
//! * Every network ACL is translated with its own entries, the VPC's default
//!   ACL included (its rule 100 allow-all entries, or whatever the user has
//!   made of them), and every subnet names the ACL it is associated with.
//!   The `*` rule (32767) is left out: the switch denies what no entry
//!   matches.
//! * The implied local route is the VPC's CIDR block (`VpcConfig::cidrs`);
//!   stored routes never hold it. `igw-` targets become internet gateway
//!   routes (the switch black-holes them unless that gateway is attached
//!   and the host has an uplink), `nat-` and `eni-` targets are passed
//!   through by ID (the switch black-holes an ENI without a port).
//! * Only ENIs for which `ports` returns a port id become ports (the caller
//!   decides: typically "attached to a running instance").
//! * Security group rules whose peer group no longer exists are dropped (they
//!   can match nothing); a value that no longer parses (never written by
//!   the API) drops that rule or route rather than the whole topology.
//! * Elastic IP associations and launch public IPs both become
//!   [`ElasticIp`] mappings (the switch NATs them alike at the internet
//!   gateway); an Elastic IP on the primary address wins over a launch IP.
//! * Flow logs with a `file` destination; scope from the resource ID prefix.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use enilab_switch::policy::{
    AclEntry as SwAclEntry, Cidr as SwCidr, ElasticIp, FlowLogConfig, FlowLogScope,
    NetworkAclConfig, Peer, PortMatch, Protocol, Route as SwRoute, RouteTableConfig,
    RouteTarget as SwTarget, SecurityGroupConfig, SgRule as SwSgRule, TrafficType,
};
use enilab_switch::{PortConfig, PortId, SubnetConfig, Topology, VpcConfig};

use crate::netns::parse_mac;
use crate::store::model::*;
use crate::store::State;

use super::config::Config;

/// The state as a switch topology, with the default account ID in flow
/// logs. See the module comment for the choices made.
pub fn topology_of(
    state: &State,
    ports: &dyn Fn(&str) -> Option<PortId>,
    generation: u64,
) -> Topology {
    topology_for_account(state, ports, generation, &Config::default().account_id)
}

/// [`topology_of`] with the account ID written into flow log records.
pub fn topology_for_account(
    state: &State,
    ports: &dyn Fn(&str) -> Option<PortId>,
    generation: u64,
    account_id: &str,
) -> Topology {
    let mut topo = Topology {
        generation,
        ..Topology::default()
    };

    for v in state.iter::<Vpc>() {
        topo.vpcs.push(VpcConfig {
            id: v.id.clone(),
            cidrs: cidr(&v.cidr).into_iter().collect(),
            internet_gateway: state
                .iter::<InternetGateway>()
                .find(|g| g.vpc_id.as_deref() == Some(v.id.as_str()))
                .map(|g| g.id.clone()),
            main_route_table: Some(v.main_route_table.clone())
                .filter(|t| state.get::<RouteTable>(t).is_some()),
        });
    }

    for s in state.iter::<Subnet>() {
        let Some(block) = cidr(&s.cidr) else {
            tracing::warn!(
                "subnet {} has an unparsable CIDR {}; left out",
                s.id,
                s.cidr
            );
            continue;
        };
        topo.subnets.push(SubnetConfig {
            id: s.id.clone(),
            vpc_id: s.vpc_id.clone(),
            cidr: (block.network(), block.prefix_len()),
            dns: None,
            route_table: state
                .iter::<RouteTable>()
                .find(|t| {
                    t.associations
                        .iter()
                        .any(|a| a.subnet_id.as_deref() == Some(s.id.as_str()))
                })
                .map(|t| t.id.clone()),
            network_acl: state
                .iter::<NetworkAcl>()
                .find(|a| a.associations.iter().any(|x| x.subnet_id == s.id))
                .map(|a| a.id.clone()),
        });
    }

    for t in state.iter::<RouteTable>() {
        let routes = t
            .routes
            .iter()
            .filter_map(|r| {
                let target = match &r.target {
                    RouteTarget::Local => return None,
                    RouteTarget::Gateway(g) if g.starts_with("igw-") => {
                        SwTarget::InternetGateway(g.clone())
                    }
                    RouteTarget::Gateway(_) => SwTarget::Blackhole,
                    RouteTarget::NatGateway(n) => SwTarget::NatGateway(n.clone()),
                    RouteTarget::NetworkInterface(e) => SwTarget::Eni(e.clone()),
                };
                Some(SwRoute {
                    destination: cidr(&r.destination)?,
                    target,
                })
            })
            .collect();
        topo.route_tables.push(RouteTableConfig {
            id: t.id.clone(),
            vpc_id: t.vpc_id.clone(),
            routes,
        });
    }

    for g in state.iter::<SecurityGroup>() {
        let rules = |rs: &[SgRule]| -> Vec<SwSgRule> {
            rs.iter().filter_map(|r| sg_rule(state, r)).collect()
        };
        topo.security_groups.push(SecurityGroupConfig {
            id: g.id.clone(),
            vpc_id: g.vpc_id.clone(),
            ingress: rules(&g.ingress),
            egress: rules(&g.egress),
        });
    }

    for a in state.iter::<NetworkAcl>() {
        let mut entries: Vec<&AclEntry> = a
            .entries
            .iter()
            .filter(|e| e.rule_number < ACL_DEFAULT_RULE)
            .collect();
        entries.sort_by_key(|e| e.rule_number);
        let side = |egress: bool| -> Vec<SwAclEntry> {
            entries
                .iter()
                .filter(|e| e.egress == egress)
                .filter_map(|e| acl_entry(e))
                .collect()
        };
        topo.network_acls.push(NetworkAclConfig {
            id: a.id.clone(),
            vpc_id: a.vpc_id.clone(),
            ingress: side(false),
            egress: side(true),
        });
    }

    for e in state.iter::<Eni>() {
        let Some(id) = ports(&e.id) else { continue };
        let Some(subnet) = topo.subnets.iter().position(|s| s.id == e.subnet_id) else {
            continue;
        };
        let (Some(mac), Some(primary)) = (parse_mac(&e.mac), ip(e.primary_ip())) else {
            tracing::warn!("ENI {} has an unparsable MAC or address; left out", e.id);
            continue;
        };
        let secondary_ips = e
            .private_ips
            .iter()
            .filter(|p| p.ip != e.primary_ip())
            .filter_map(|p| ip(&p.ip))
            .collect();
        topo.ports.push(PortConfig {
            id,
            eni_id: e.id.clone(),
            mac,
            subnet,
            primary_ip: primary,
            secondary_ips,
            prefixes: e.prefixes.iter().filter_map(|p| cidr(p)).collect(),
            security_groups: e.groups.clone(),
            source_dest_check: e.source_dest_check,
            ..PortConfig::default()
        });
    }

    for a in state.iter::<Address>() {
        let Some(s) = &a.association else { continue };
        let Some(e) = state.get::<Eni>(&s.eni_id) else {
            continue;
        };
        if let (Some(public_ip), Some(private_ip)) = (ip(&a.public_ip), ip(&s.private_ip)) {
            topo.elastic_ips.push(ElasticIp {
                public_ip,
                vpc_id: e.vpc_id.clone(),
                private_ip,
            });
        }
    }
    for e in state.iter::<Eni>() {
        let Some(public) = e.public_ip.as_deref().and_then(ip) else {
            continue;
        };
        let Some(private_ip) = ip(e.primary_ip()) else {
            continue;
        };
        if topo
            .elastic_ips
            .iter()
            .any(|x| x.vpc_id == e.vpc_id && x.private_ip == private_ip)
        {
            continue;
        }
        topo.elastic_ips.push(ElasticIp {
            public_ip: public,
            vpc_id: e.vpc_id.clone(),
            private_ip,
        });
    }

    for f in state.iter::<FlowLog>() {
        if f.destination_type != "file" {
            continue;
        }
        let r = &f.resource_id;
        let scope = if r.starts_with("eni-") {
            FlowLogScope::Eni(r.clone())
        } else if r.starts_with("subnet-") {
            FlowLogScope::Subnet(r.clone())
        } else if r.starts_with("vpc-") {
            FlowLogScope::Vpc(r.clone())
        } else {
            continue;
        };
        let traffic = match f.traffic_type.as_str() {
            "ACCEPT" => TrafficType::Accept,
            "REJECT" => TrafficType::Reject,
            _ => TrafficType::All,
        };
        topo.flow_logs.push(FlowLogConfig {
            id: f.id.clone(),
            scope,
            traffic,
            interval_secs: f.max_aggregation_interval,
            path: PathBuf::from(&f.destination),
            account_id: account_id.to_string(),
        });
    }
    topo
}

fn cidr(s: &str) -> Option<SwCidr> {
    s.parse().ok()
}

fn ip(s: &str) -> Option<Ipv4Addr> {
    s.parse().ok()
}

fn sg_rule(state: &State, r: &SgRule) -> Option<SwSgRule> {
    let protocol: Protocol = r.protocol.parse().ok()?;
    let ports =
        PortMatch::from_aws(protocol, r.from_port.unwrap_or(-1), r.to_port.unwrap_or(-1)).ok()?;
    let peer = match &r.peer {
        SgPeer::Cidr(c) => Peer::Cidr(cidr(c)?),
        SgPeer::Group(g) => {
            state.get::<SecurityGroup>(g)?;
            Peer::Group(g.clone())
        }
    };
    Some(SwSgRule {
        protocol,
        ports,
        peer,
    })
}

fn acl_entry(e: &AclEntry) -> Option<SwAclEntry> {
    let protocol: Protocol = e.protocol.parse().ok()?;
    let ports = if protocol == Protocol::ICMP {
        let (t, c) = e.icmp.unwrap_or((-1, -1));
        PortMatch::from_aws(protocol, t, c).ok()?
    } else if protocol.has_ports() {
        let (lo, hi) = e.ports.unwrap_or((-1, -1));
        PortMatch::from_aws(protocol, lo, hi).ok()?
    } else {
        PortMatch::Any
    };
    Some(SwAclEntry {
        number: e.rule_number,
        protocol,
        ports,
        cidr: cidr(&e.cidr)?,
        allow: e.allow,
    })
}

/// Give every instance interface among `topo`'s ports its type's
/// allowances (`InstanceType::limits`), and every (instance, network card)
/// that has at least one of them an aggregate (`InstanceType::card_limits`)
/// that its interfaces there share. Interfaces of unknown types, and ports
/// that are no instance's (NAT gateways, load balancers), are left alone.
pub fn apply_allowances(
    state: &State,
    types: &std::collections::BTreeMap<String, super::config::InstanceType>,
    topo: &mut Topology,
) {
    let mut cards: std::collections::BTreeMap<(String, u32), enilab_switch::CardLimits> =
        std::collections::BTreeMap::new();
    for p in &mut topo.ports {
        let Some(a) = state
            .get::<Eni>(&p.eni_id)
            .and_then(|e| e.attachment.as_ref())
        else {
            continue;
        };
        let Some(t) = state
            .get::<Instance>(&a.instance_id)
            .and_then(|i| types.get(&i.instance_type))
        else {
            continue;
        };
        p.limits = t.limits();
        let key = (a.instance_id.clone(), a.card_index);
        cards.entry(key.clone()).or_insert_with(|| t.card_limits());
        p.card = Some(key);
    }
    topo.cards = cards
        .into_iter()
        .map(|((instance, card), limits)| enilab_switch::CardConfig {
            instance,
            card,
            limits,
        })
        .collect();
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use enilab_switch::Snapshot;

    use super::*;
    use crate::api::driver::RecordingDriver;
    use crate::api::query::Params;
    use crate::api::Api;

    struct Lab {
        api: Arc<Api>,
        dir: PathBuf,
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.dir).ok();
        }
    }

    impl Lab {
        fn new(tag: &str) -> Lab {
            let dir = std::env::temp_dir().join(format!(
                "enilab-datapath-{tag}-{}",
                crate::store::ids::random_u64()
            ));
            let api = Api::open(&dir, Config::default(), Arc::new(RecordingDriver)).unwrap();
            Lab { api, dir }
        }

        /// Call an action through the same path HTTP requests take.
        fn call(&self, action: &str, args: &[(&str, &str)]) -> String {
            let mut pairs = vec![("Action", action), ("Version", "2016-11-15")];
            pairs.extend_from_slice(args);
            let r = self.api.call(&Params::from_pairs(pairs));
            assert_eq!(r.status, 200, "{action}: {}", r.body);
            r.body
        }

        fn topology(&self) -> Topology {
            assert!(self.api.jobs.wait_idle(Duration::from_secs(10)));
            self.api.store.read(|st| {
                // Ports for ENIs of running instances, numbered in ID order.
                let running: BTreeMap<String, PortId> = st
                    .iter::<Eni>()
                    .filter(|e| {
                        e.attachment.as_ref().is_some_and(|a| {
                            st.get::<Instance>(&a.instance_id)
                                .is_some_and(|i| i.state == InstanceState::Running)
                        })
                    })
                    .enumerate()
                    .map(|(n, e)| (e.id.clone(), n as PortId))
                    .collect();
                topology_of(st, &|e| running.get(e).copied(), 7)
            })
        }
    }

    use crate::api::bench::field;

    #[test]
    fn api_state_compiles_into_the_expected_topology() {
        let lab = Lab::new("full");
        let vpc = field(
            &lab.call("CreateVpc", &[("CidrBlock", "10.7.0.0/16")]),
            "vpcId",
        );
        let subnet = field(
            &lab.call(
                "CreateSubnet",
                &[("VpcId", &vpc), ("CidrBlock", "10.7.1.0/24")],
            ),
            "subnetId",
        );
        lab.call(
            "ModifySubnetAttribute",
            &[("SubnetId", &subnet), ("MapPublicIpOnLaunch.Value", "true")],
        );
        let sg = field(
            &lab.call(
                "CreateSecurityGroup",
                &[
                    ("GroupName", "web"),
                    ("GroupDescription", "web"),
                    ("VpcId", &vpc),
                ],
            ),
            "groupId",
        );
        lab.call(
            "AuthorizeSecurityGroupIngress",
            &[
                ("GroupId", &sg),
                ("IpPermissions.1.IpProtocol", "tcp"),
                ("IpPermissions.1.FromPort", "80"),
                ("IpPermissions.1.ToPort", "443"),
                ("IpPermissions.1.IpRanges.1.CidrIp", "192.0.2.0/24"),
                ("IpPermissions.2.IpProtocol", "icmp"),
                ("IpPermissions.2.FromPort", "8"),
                ("IpPermissions.2.ToPort", "-1"),
                ("IpPermissions.2.Groups.1.GroupId", &sg),
            ],
        );
        let igw = field(&lab.call("CreateInternetGateway", &[]), "internetGatewayId");
        lab.call(
            "AttachInternetGateway",
            &[("InternetGatewayId", &igw), ("VpcId", &vpc)],
        );
        let rtb = field(
            &lab.call("CreateRouteTable", &[("VpcId", &vpc)]),
            "routeTableId",
        );
        lab.call(
            "CreateRoute",
            &[
                ("RouteTableId", &rtb),
                ("DestinationCidrBlock", "0.0.0.0/0"),
                ("GatewayId", &igw),
            ],
        );
        lab.call(
            "AssociateRouteTable",
            &[("RouteTableId", &rtb), ("SubnetId", &subnet)],
        );
        let default_acl = lab
            .api
            .store
            .read(|st| st.get::<Vpc>(&vpc).unwrap().default_acl.clone());
        lab.call(
            "CreateNetworkAclEntry",
            &[
                ("NetworkAclId", &default_acl),
                ("RuleNumber", "50"),
                ("Protocol", "6"),
                ("RuleAction", "deny"),
                ("Egress", "false"),
                ("CidrBlock", "0.0.0.0/0"),
                ("PortRange.From", "22"),
                ("PortRange.To", "22"),
            ],
        );
        let inst = field(
            &lab.call(
                "RunInstances",
                &[
                    ("ImageId", crate::api::instance::IMAGE_ID),
                    ("InstanceType", "m5.large"),
                    ("MinCount", "1"),
                    ("MaxCount", "1"),
                    ("SubnetId", &subnet),
                    ("SecurityGroupId.1", &sg),
                ],
            ),
            "instanceId",
        );
        let second = lab.call(
            "CreateNetworkInterface",
            &[
                ("SubnetId", &subnet),
                ("SecondaryPrivateIpAddressCount", "1"),
            ],
        );
        let eni2 = field(&second, "networkInterfaceId");
        lab.call(
            "AssignPrivateIpAddresses",
            &[("NetworkInterfaceId", &eni2), ("Ipv4PrefixCount", "1")],
        );
        lab.call(
            "AttachNetworkInterface",
            &[
                ("NetworkInterfaceId", &eni2),
                ("InstanceId", &inst),
                ("DeviceIndex", "1"),
            ],
        );
        lab.call(
            "ModifyNetworkInterfaceAttribute",
            &[
                ("NetworkInterfaceId", &eni2),
                ("SourceDestCheck.Value", "false"),
            ],
        );
        let alloc = lab.call("AllocateAddress", &[("Domain", "vpc")]);
        let eip = field(&alloc, "publicIp");
        lab.call(
            "AssociateAddress",
            &[
                ("AllocationId", &field(&alloc, "allocationId")),
                ("NetworkInterfaceId", &eni2),
            ],
        );
        let fl = field(
            &lab.call(
                "CreateFlowLogs",
                &[
                    ("ResourceId.1", &subnet),
                    ("ResourceType", "Subnet"),
                    ("TrafficType", "REJECT"),
                    ("LogDestination", "/tmp/enilab-datapath-test.log"),
                ],
            ),
            "item",
        );

        let topo = lab.topology();
        assert_eq!(topo.generation, 7);
        let snap = Snapshot::compile(topo.clone()).expect("the topology compiles");
        assert_eq!(snap.generation, 7);

        // VPC, subnet, routes.
        assert_eq!(topo.vpcs.len(), 1);
        let v = &topo.vpcs[0];
        assert_eq!(v.cidrs, vec!["10.7.0.0/16".parse::<SwCidr>().unwrap()]);
        assert_eq!(v.internet_gateway.as_deref(), Some(igw.as_str()));
        assert!(v.main_route_table.as_deref().is_some_and(|m| m != rtb));
        let s = &topo.subnets[0];
        assert_eq!(s.cidr, (Ipv4Addr::new(10, 7, 1, 0), 24));
        assert_eq!(s.route_table.as_deref(), Some(rtb.as_str()));
        assert_eq!(s.network_acl.as_deref(), Some(default_acl.as_str()));
        let t = topo.route_tables.iter().find(|t| t.id == rtb).unwrap();
        assert_eq!(
            t.routes,
            vec![SwRoute {
                destination: SwCidr::ANY,
                target: SwTarget::InternetGateway(igw.clone()),
            }]
        );

        // The security group rules from AuthorizeSecurityGroupIngress.
        let g = topo.security_groups.iter().find(|g| g.id == sg).unwrap();
        assert_eq!(
            g.ingress,
            vec![
                SwSgRule {
                    protocol: Protocol::TCP,
                    ports: PortMatch::Ports { lo: 80, hi: 443 },
                    peer: Peer::Cidr("192.0.2.0/24".parse().unwrap()),
                },
                SwSgRule {
                    protocol: Protocol::ICMP,
                    ports: PortMatch::Icmp {
                        icmp_type: Some(8),
                        code: None,
                    },
                    peer: Peer::Group(sg.clone()),
                },
            ]
        );
        assert_eq!(
            g.egress,
            vec![SwSgRule {
                protocol: Protocol::All,
                ports: PortMatch::Any,
                peer: Peer::Cidr(SwCidr::ANY),
            }]
        );

        // The default ACL: rule 50 deny first, then rule 100 allow; no `*`.
        let acl = topo
            .network_acls
            .iter()
            .find(|a| a.id == default_acl)
            .unwrap();
        let rules: Vec<(u16, bool)> = acl.ingress.iter().map(|e| (e.number, e.allow)).collect();
        assert_eq!(rules, vec![(50, false), (100, true)]);
        assert_eq!(acl.ingress[0].protocol, Protocol::TCP);
        assert_eq!(acl.ingress[0].ports, PortMatch::Ports { lo: 22, hi: 22 });
        let rules: Vec<(u16, bool)> = acl.egress.iter().map(|e| (e.number, e.allow)).collect();
        assert_eq!(rules, vec![(100, true)]);

        // Both interfaces of the running instance are ports.
        let (primary, e2) = lab.api.store.read(|st| {
            let p = st
                .iter::<Eni>()
                .find(|e| e.id != eni2 && e.attachment.is_some())
                .unwrap()
                .clone();
            (p, st.get::<Eni>(&eni2).unwrap().clone())
        });
        assert_eq!(topo.ports.len(), 2);
        let p1 = topo.ports.iter().find(|p| p.eni_id == primary.id).unwrap();
        assert_eq!(p1.security_groups, vec![sg.clone()]);
        assert_eq!(p1.primary_ip.to_string(), primary.primary_ip());
        assert!(p1.source_dest_check);
        assert_eq!(
            p1.mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":"),
            primary.mac
        );
        let p2 = topo.ports.iter().find(|p| p.eni_id == eni2).unwrap();
        assert!(!p2.source_dest_check);
        assert_eq!(p2.secondary_ips.len(), 1);
        assert_eq!(p2.prefixes.len(), 1);
        assert_eq!(p2.prefixes[0].prefix_len(), 28);
        assert_eq!(p2.prefixes[0].to_string(), e2.prefixes[0]);

        // The launch public IP (subnet attribute) and the Elastic IP.
        let launch_ip = primary.public_ip.clone().expect("a launch public IP");
        let mut eips: Vec<(String, String)> = topo
            .elastic_ips
            .iter()
            .map(|e| (e.public_ip.to_string(), e.private_ip.to_string()))
            .collect();
        eips.sort();
        let mut want = vec![
            (launch_ip, primary.primary_ip().to_string()),
            (eip, e2.primary_ip().to_string()),
        ];
        want.sort();
        assert_eq!(eips, want);
        assert!(topo.elastic_ips.iter().all(|e| e.vpc_id == vpc));

        // The flow log.
        assert_eq!(
            topo.flow_logs,
            vec![FlowLogConfig {
                id: fl,
                scope: FlowLogScope::Subnet(subnet.clone()),
                traffic: TrafficType::Reject,
                interval_secs: 600,
                path: PathBuf::from("/tmp/enilab-datapath-test.log"),
                account_id: Config::default().account_id,
            }]
        );

        // Stopped: no ports, no launch public IP; still compiles.
        lab.call("StopInstances", &[("InstanceId.1", &inst)]);
        let topo = lab.topology();
        assert!(topo.ports.is_empty());
        assert_eq!(topo.elastic_ips.len(), 1, "only the Elastic IP is left");
        Snapshot::compile(topo).expect("compiles without ports");
    }

    /// Interfaces get their type's allowances; each (instance, card) with
    /// interfaces gets one aggregate they share; the snapshot compiles.
    #[test]
    fn allowances_per_interface_and_per_card() {
        let lab = Lab::new("allowances");
        let vpc = field(
            &lab.call("CreateVpc", &[("CidrBlock", "10.8.0.0/16")]),
            "vpcId",
        );
        let subnet = field(
            &lab.call(
                "CreateSubnet",
                &[("VpcId", &vpc), ("CidrBlock", "10.8.1.0/24")],
            ),
            "subnetId",
        );
        let run = |ty: &str| {
            field(
                &lab.call(
                    "RunInstances",
                    &[
                        ("ImageId", crate::api::instance::IMAGE_ID),
                        ("InstanceType", ty),
                        ("MinCount", "1"),
                        ("MaxCount", "1"),
                        ("SubnetId", &subnet),
                    ],
                ),
                "instanceId",
            )
        };
        let big = run("c6in.32xlarge");
        let small = run("t3.micro");
        // (instance, device, card) for three more interfaces.
        for (inst, device, card) in [(&big, "1", "0"), (&big, "2", "1"), (&small, "1", "0")] {
            let eni = field(
                &lab.call("CreateNetworkInterface", &[("SubnetId", &subnet)]),
                "networkInterfaceId",
            );
            lab.call(
                "AttachNetworkInterface",
                &[
                    ("NetworkInterfaceId", &eni),
                    ("InstanceId", inst),
                    ("DeviceIndex", device),
                    ("NetworkCardIndex", card),
                ],
            );
        }
        let mut topo = lab.topology();
        assert_eq!(topo.ports.len(), 5);
        let types = &Config::default().types;
        lab.api
            .store
            .read(|st| apply_allowances(st, types, &mut topo));
        let cards: Vec<(String, u32, u64)> = topo
            .cards
            .iter()
            .map(|c| (c.instance.clone(), c.card, c.limits.bw_out_bps))
            .collect();
        let mut want = vec![
            (big.clone(), 0, 100_000_000_000),
            (big.clone(), 1, 100_000_000_000),
            (small.clone(), 0, 5_000_000_000),
        ];
        want.sort();
        assert_eq!(cards, want);
        // Ports per card: the big instance has two on card 0, one on 1.
        let on = |inst: &str, card: u32| {
            topo.ports
                .iter()
                .filter(|p| p.card == Some((inst.to_string(), card)))
                .map(|p| p.limits)
                .collect::<Vec<_>>()
        };
        assert_eq!(on(&big, 0), vec![types["c6in.32xlarge"].limits(); 2]);
        assert_eq!(on(&big, 1), vec![types["c6in.32xlarge"].limits()]);
        assert_eq!(on(&small, 0), vec![types["t3.micro"].limits(); 2]);
        Snapshot::compile(topo).expect("compiles with cards");
    }

    #[test]
    fn empty_state_and_unparsable_values() {
        let st = State::default();
        let topo = topology_of(&st, &|_| Some(1), 1);
        assert_eq!(topo.generation, 1);
        assert!(topo.vpcs.is_empty() && topo.ports.is_empty());
        Snapshot::compile(topo).unwrap();
        assert_eq!(parse_mac("02:00:0a:ff:10:01"), Some([2, 0, 10, 255, 16, 1]));
        for bad in [
            "",
            "02:00:0a:ff:10",
            "02:00:0a:ff:10:01:02",
            "2:00:0a:ff:10:1",
            "zz:00:0a:ff:10:01",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
