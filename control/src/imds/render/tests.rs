//! The tree rendered from state the real API handlers wrote.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::api::driver::RecordingDriver;
use crate::api::query::Params;
use crate::api::{Api, Config};
use crate::store::model::Instance;

const ACCOUNT: &str = "123456789012";

pub(crate) struct Lab {
    pub api: Arc<Api>,
    dir: PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

pub(crate) use crate::api::bench::field;

impl Lab {
    pub fn new(tag: &str) -> Lab {
        let dir = std::env::temp_dir().join(format!(
            "enilab-imds-{tag}-{}",
            crate::store::ids::random_u64()
        ));
        let api = Api::open(&dir, Config::default(), Arc::new(RecordingDriver)).unwrap();
        Lab { api, dir }
    }

    /// Call an action through the same path HTTP requests take.
    pub fn call(&self, action: &str, args: &[(&str, &str)]) -> String {
        let mut pairs = vec![("Action", action), ("Version", "2016-11-15")];
        pairs.extend_from_slice(args);
        let r = self.api.call(&Params::from_pairs(pairs));
        assert_eq!(r.status, 200, "{action}: {}", r.body);
        assert!(self.api.jobs.wait_idle(Duration::from_secs(10)));
        r.body
    }

    pub fn get(&self, instance: &str, path: &str) -> Answer {
        self.api
            .store
            .read(|st| lookup(st, ACCOUNT, instance, path))
    }

    pub fn eni(&self, id: &str) -> Eni {
        self.api
            .store
            .read(|st| st.get::<Eni>(id).cloned())
            .unwrap()
    }
}

/// What the scenario created.
pub(crate) struct World {
    pub lab: Lab,
    pub vpc: String,
    pub subnet: String,
    pub sg: String,
    pub instance: String,
    pub eni0: Eni,
    pub eni1: Eni,
    pub eip: String,
}

pub(crate) const USER_DATA: &[u8] = b"#!/bin/sh\necho hello from user data\n";

/// A VPC with an internet gateway; an m5.large launched with user data and
/// a launch public IP; a second interface (a chosen primary address, one
/// secondary, one /28 prefix) attached at device 1 with an Elastic IP on
/// its secondary address.
pub(crate) fn world(tag: &str) -> World {
    let lab = Lab::new(tag);
    let vpc = field(
        &lab.call("CreateVpc", &[("CidrBlock", "10.9.0.0/16")]),
        "vpcId",
    );
    let subnet = field(
        &lab.call(
            "CreateSubnet",
            &[
                ("VpcId", &vpc),
                ("CidrBlock", "10.9.1.0/24"),
                ("AvailabilityZone", "us-east-1b"),
            ],
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
    let igw = field(&lab.call("CreateInternetGateway", &[]), "internetGatewayId");
    lab.call(
        "AttachInternetGateway",
        &[("InternetGatewayId", &igw), ("VpcId", &vpc)],
    );
    let ud = enilab_agent::b64::encode(USER_DATA);
    let run = lab.call(
        "RunInstances",
        &[
            ("ImageId", crate::api::instance::IMAGE_ID),
            ("InstanceType", "m5.large"),
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("SubnetId", &subnet),
            ("SecurityGroupId.1", &sg),
            ("UserData", &ud),
        ],
    );
    let instance = field(&run, "instanceId");
    let eni0 = lab.eni(&field(&run, "networkInterfaceId"));
    let eni1 = field(
        &lab.call(
            "CreateNetworkInterface",
            &[
                ("SubnetId", &subnet),
                ("PrivateIpAddress", "10.9.1.50"),
                ("SecondaryPrivateIpAddressCount", "1"),
                ("SecurityGroupId.1", &sg),
            ],
        ),
        "networkInterfaceId",
    );
    // AWS takes addresses and prefixes in separate calls.
    lab.call(
        "AssignPrivateIpAddresses",
        &[("NetworkInterfaceId", &eni1), ("Ipv4PrefixCount", "1")],
    );
    lab.call(
        "AttachNetworkInterface",
        &[
            ("NetworkInterfaceId", &eni1),
            ("InstanceId", &instance),
            ("DeviceIndex", "1"),
        ],
    );
    let eni1 = lab.eni(&eni1);
    let eip_alloc = field(
        &lab.call("AllocateAddress", &[("Domain", "vpc")]),
        "allocationId",
    );
    let secondary = eni1.private_ips[1].ip.clone();
    lab.call(
        "AssociateAddress",
        &[
            ("AllocationId", &eip_alloc),
            ("NetworkInterfaceId", &eni1.id),
            ("PrivateIpAddress", &secondary),
        ],
    );
    let eip = lab
        .api
        .store
        .read(|st| st.get::<Address>(&eip_alloc).map(|a| a.public_ip.clone()))
        .unwrap();
    World {
        lab,
        vpc,
        subnet,
        sg,
        instance,
        eni0,
        eni1,
        eip,
    }
}

fn t(s: &str) -> Answer {
    Answer::Text(s.to_string())
}

#[test]
fn the_tree_matches_the_api_state() {
    let w = world("tree");
    let (e0, e1) = (&w.eni0, &w.eni1);
    let ip0 = e0.primary_ip().to_string();
    let public0 = e0.public_ip.clone().expect("a launch public IP");
    let secondary1 = e1.private_ips[1].ip.clone();
    let prefix1 = e1.prefixes[0].clone();
    assert_eq!(e1.primary_ip(), "10.9.1.50");
    let host0 = format!("ip-{}.ec2.internal", ip0.replace('.', "-"));
    let m0 = format!("/latest/meta-data/network/interfaces/macs/{}/", e0.mac);
    let m1 = format!("/latest/meta-data/network/interfaces/macs/{}/", e1.mac);
    let p = |base: &str, leaf: &str| format!("{base}{leaf}");

    let table: Vec<(String, Answer)> = vec![
        ("/".into(), t("latest/")),
        ("/latest".into(), t("dynamic/\nmeta-data/\nuser-data")),
        ("/latest/".into(), t("dynamic/\nmeta-data/\nuser-data")),
        (
            "/latest/meta-data/".into(),
            t(
                "ami-id\nami-launch-index\nhostname\ninstance-id\ninstance-life-cycle\n\
               instance-type\nlocal-hostname\nlocal-ipv4\nmac\nnetwork/\nplacement/\n\
               public-ipv4\nreservation-id\nsecurity-groups\nservices/",
            ),
        ),
        (
            "/latest/meta-data/ami-id".into(),
            t(crate::api::instance::IMAGE_ID),
        ),
        ("/latest/meta-data/ami-launch-index".into(), t("0")),
        ("/latest/meta-data/instance-id".into(), t(&w.instance)),
        // A trailing slash on a value is tolerated.
        ("/latest/meta-data/instance-id/".into(), t(&w.instance)),
        ("/latest/meta-data/instance-type".into(), t("m5.large")),
        ("/latest/meta-data/local-ipv4".into(), t(&ip0)),
        ("/latest/meta-data/mac".into(), t(&e0.mac)),
        ("/latest/meta-data/hostname".into(), t(&host0)),
        ("/latest/meta-data/local-hostname".into(), t(&host0)),
        ("/latest/meta-data/public-ipv4".into(), t(&public0)),
        ("/latest/meta-data/security-groups".into(), t("web")),
        (
            "/latest/meta-data/placement/".into(),
            t("availability-zone\nregion"),
        ),
        // A directory without its trailing slash still lists.
        (
            "/latest/meta-data/placement".into(),
            t("availability-zone\nregion"),
        ),
        (
            "/latest/meta-data/placement/availability-zone".into(),
            t("us-east-1b"),
        ),
        ("/latest/meta-data/placement/region".into(), t("us-east-1")),
        ("/latest/meta-data/network/".into(), t("interfaces/")),
        ("/latest/meta-data/network/interfaces/".into(), t("macs/")),
        (
            "/latest/meta-data/network/interfaces/macs/".into(),
            t(&{
                let mut v = [format!("{}/", e0.mac), format!("{}/", e1.mac)];
                v.sort();
                v.join("\n")
            }),
        ),
        (
            m0.clone(),
            t(
                "device-number\ninterface-id\nipv4-associations/\nlocal-hostname\n\
               local-ipv4s\nmac\nnetwork-card\nowner-id\npublic-ipv4s\n\
               security-group-ids\nsecurity-groups\nsubnet-id\nsubnet-ipv4-cidr-block\n\
               vpc-id\nvpc-ipv4-cidr-block\nvpc-ipv4-cidr-blocks",
            ),
        ),
        (p(&m0, "device-number"), t("0")),
        (p(&m0, "network-card"), t("0")),
        (p(&m0, "interface-id"), t(&e0.id)),
        (p(&m0, "local-ipv4s"), t(&ip0)),
        (p(&m0, "public-ipv4s"), t(&public0)),
        (p(&m0, "ipv4-associations/"), t(&public0)),
        (p(&m0, &format!("ipv4-associations/{public0}")), t(&ip0)),
        (p(&m0, "ipv4-prefix"), Answer::NotFound),
        (p(&m0, "mac"), t(&e0.mac)),
        (p(&m0, "owner-id"), t(ACCOUNT)),
        (p(&m0, "local-hostname"), t(&host0)),
        (
            m1.clone(),
            t(
                "device-number\ninterface-id\nipv4-associations/\nipv4-prefix\n\
               local-hostname\nlocal-ipv4s\nmac\nnetwork-card\nowner-id\npublic-ipv4s\n\
               security-group-ids\nsecurity-groups\nsubnet-id\nsubnet-ipv4-cidr-block\n\
               vpc-id\nvpc-ipv4-cidr-block\nvpc-ipv4-cidr-blocks",
            ),
        ),
        (p(&m1, "device-number"), t("1")),
        (p(&m1, "network-card"), t("0")),
        (p(&m1, "interface-id"), t(&e1.id)),
        (
            p(&m1, "local-ipv4s"),
            t(&format!("10.9.1.50\n{secondary1}")),
        ),
        (p(&m1, "ipv4-prefix"), t(&prefix1)),
        (p(&m1, "public-ipv4s"), t(&w.eip)),
        (
            p(&m1, &format!("ipv4-associations/{}", w.eip)),
            t(&secondary1),
        ),
        (p(&m1, "subnet-id"), t(&w.subnet)),
        (p(&m1, "subnet-ipv4-cidr-block"), t("10.9.1.0/24")),
        (p(&m1, "vpc-id"), t(&w.vpc)),
        (p(&m1, "vpc-ipv4-cidr-block"), t("10.9.0.0/16")),
        (p(&m1, "vpc-ipv4-cidr-blocks"), t("10.9.0.0/16")),
        (p(&m1, "security-group-ids"), t(&w.sg)),
        (p(&m1, "security-groups"), t("web")),
        (p(&m1, "local-hostname"), t("ip-10-9-1-50.ec2.internal")),
        (
            "/latest/user-data".into(),
            Answer::Bytes(USER_DATA.to_vec()),
        ),
        ("/latest/dynamic/".into(), t("instance-identity/")),
        ("/latest/dynamic/instance-identity/".into(), t("document")),
        // What does not exist.
        ("/latest/meta-data/nope".into(), Answer::NotFound),
        ("/latest/meta-data/instance-id/x".into(), Answer::NotFound),
        ("/latest//meta-data/".into(), Answer::NotFound),
        ("/latest/meta-data//".into(), Answer::NotFound),
        ("latest/meta-data/".into(), Answer::NotFound),
        ("".into(), Answer::NotFound),
        ("/2009-04-04/meta-data/".into(), Answer::NotFound),
        (p(&m1, "ipv4-associations/203.0.113.254"), Answer::NotFound),
        (
            "/latest/meta-data/network/interfaces/macs/02:00:00:00:00:01/".into(),
            Answer::NotFound,
        ),
    ];
    let mut failures = Vec::new();
    for (path, want) in &table {
        let got = w.lab.get(&w.instance, path);
        if &got != want {
            failures.push(format!("{path}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn identity_document_is_json_with_the_instance_facts() {
    let w = world("doc");
    let Answer::Json(doc) = w
        .lab
        .get(&w.instance, "/latest/dynamic/instance-identity/document")
    else {
        panic!("not JSON");
    };
    let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let inst: Instance = w
        .lab
        .api
        .store
        .read(|st| st.get::<Instance>(&w.instance).cloned())
        .unwrap();
    assert_eq!(v["instanceId"], w.instance.as_str());
    assert_eq!(v["accountId"], ACCOUNT);
    assert_eq!(v["imageId"], crate::api::instance::IMAGE_ID);
    assert_eq!(v["instanceType"], "m5.large");
    assert_eq!(v["availabilityZone"], "us-east-1b");
    assert_eq!(v["region"], "us-east-1");
    assert_eq!(v["privateIp"], w.eni0.primary_ip());
    assert_eq!(v["architecture"], "x86_64");
    assert!(v["kernelId"].is_null());
    let pending = v["pendingTime"].as_str().unwrap();
    let api_form = crate::api::common::iso8601(inst.launch_time - inst.launch_time % 1000);
    assert_eq!(format!("{}.000Z", pending.trim_end_matches('Z')), api_form);
}

#[test]
fn detach_and_address_moves_show_at_once() {
    let w = world("moves");
    let lab = &w.lab;
    let m0 = format!("/latest/meta-data/network/interfaces/macs/{}/", w.eni0.mac);
    let m1 = format!("/latest/meta-data/network/interfaces/macs/{}/", w.eni1.mac);
    let moved = w.eni1.private_ips[1].ip.clone();

    // The secondary address (with its Elastic IP) moves to the primary ENI.
    lab.call(
        "AssignPrivateIpAddresses",
        &[
            ("NetworkInterfaceId", &w.eni0.id),
            ("PrivateIpAddress.1", &moved),
            ("AllowReassignment", "true"),
        ],
    );
    assert_eq!(
        lab.get(&w.instance, &format!("{m0}local-ipv4s")),
        t(&format!("{}\n{moved}", w.eni0.primary_ip()))
    );
    assert_eq!(
        lab.get(&w.instance, &format!("{m1}local-ipv4s")),
        t("10.9.1.50")
    );
    assert_eq!(
        lab.get(&w.instance, &format!("{m1}public-ipv4s")),
        Answer::NotFound
    );
    let Answer::Text(pubs) = lab.get(&w.instance, &format!("{m0}public-ipv4s")) else {
        panic!("no public-ipv4s on the primary");
    };
    assert_eq!(pubs.lines().nth(1), Some(w.eip.as_str()), "{pubs}");

    // Detach: the interface's directory goes away.
    let att = lab.eni(&w.eni1.id).attachment.unwrap().id;
    lab.call("DetachNetworkInterface", &[("AttachmentId", &att)]);
    assert_eq!(
        lab.get(&w.instance, "/latest/meta-data/network/interfaces/macs/"),
        t(&format!("{}/", w.eni0.mac))
    );
    assert_eq!(lab.get(&w.instance, &m1), Answer::NotFound);

    // Attached again at another device index: it is back, renumbered.
    lab.call(
        "AttachNetworkInterface",
        &[
            ("NetworkInterfaceId", &w.eni1.id),
            ("InstanceId", &w.instance),
            ("DeviceIndex", "2"),
        ],
    );
    assert_eq!(lab.get(&w.instance, &format!("{m1}device-number")), t("2"));

    // A stopped instance loses its launch public IP.
    lab.call("StopInstances", &[("InstanceId.1", &w.instance)]);
    assert_eq!(
        lab.get(&w.instance, "/latest/meta-data/public-ipv4"),
        Answer::NotFound
    );
}

#[test]
fn only_attaching_or_attached_interfaces_are_visible() {
    let w = world("status");
    w.lab
        .api
        .store
        .write(|txn| {
            let mut e = txn.get::<Eni>(&w.eni1.id).unwrap().clone();
            if let Some(a) = e.attachment.as_mut() {
                a.status = AttachmentStatus::Detaching;
            }
            txn.put(e);
            Ok::<_, crate::store::StoreError>(())
        })
        .unwrap();
    assert_eq!(
        w.lab
            .get(&w.instance, "/latest/meta-data/network/interfaces/macs/"),
        t(&format!("{}/", w.eni0.mac))
    );
    w.lab
        .api
        .store
        .write(|txn| {
            let mut e = txn.get::<Eni>(&w.eni1.id).unwrap().clone();
            if let Some(a) = e.attachment.as_mut() {
                a.status = AttachmentStatus::Attaching;
            }
            txn.put(e);
            Ok::<_, crate::store::StoreError>(())
        })
        .unwrap();
    let Answer::Text(macs) = w
        .lab
        .get(&w.instance, "/latest/meta-data/network/interfaces/macs/")
    else {
        panic!("no macs listing");
    };
    assert_eq!(macs.lines().count(), 2, "{macs}");
}

#[test]
fn without_user_data_or_instance_there_is_nothing() {
    let w = world("nouser");
    let run = w.lab.call(
        "RunInstances",
        &[
            ("ImageId", crate::api::instance::IMAGE_ID),
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("NetworkInterface.1.DeviceIndex", "0"),
            ("NetworkInterface.1.SubnetId", &w.subnet),
            ("NetworkInterface.1.AssociatePublicIpAddress", "false"),
        ],
    );
    let other = field(&run, "instanceId");
    assert_eq!(w.lab.get(&other, "/latest/user-data"), Answer::NotFound);
    assert_eq!(w.lab.get(&other, "/latest/"), t("dynamic/\nmeta-data/"));
    assert_eq!(
        w.lab.get(&other, "/latest/meta-data/public-ipv4"),
        Answer::NotFound
    );
    assert_eq!(
        w.lab.get(&other, "/latest/meta-data/instance-type"),
        t("t3.micro")
    );
    // The other instance sees its own interface only.
    let Answer::Text(macs) = w
        .lab
        .get(&other, "/latest/meta-data/network/interfaces/macs/")
    else {
        panic!("no macs listing");
    };
    assert_eq!(macs.lines().count(), 1);
    assert!(!macs.contains(&w.eni0.mac) && !macs.contains(&w.eni1.mac));
    assert_eq!(
        w.lab.get("i-0000000000000dead", "/latest/meta-data/"),
        Answer::NotFound
    );
}

#[test]
fn names_and_regions() {
    assert_eq!(region_of("us-east-1a"), "us-east-1");
    assert_eq!(region_of("eu-west-3c"), "eu-west-3");
    assert_eq!(region_of("lab"), "lab");
    assert_eq!(region_of(""), "");
    assert_eq!(region_of("é1a"), "é1");
    assert_eq!(
        private_dns("10.0.1.5", "us-east-1"),
        "ip-10-0-1-5.ec2.internal"
    );
    assert_eq!(
        private_dns("10.0.1.5", "eu-west-1"),
        "ip-10-0-1-5.eu-west-1.compute.internal"
    );
}

#[test]
fn user_data_that_is_not_base64_is_served_as_stored() {
    let mut inst = Instance {
        id: "i-00000000000000001".into(),
        reservation_id: "r-1".into(),
        image_id: "ami-1".into(),
        instance_type: "t3.micro".into(),
        state: crate::store::model::InstanceState::Running,
        state_reason: None,
        transition_reason: String::new(),
        subnet_id: String::new(),
        vpc_id: String::new(),
        az: "us-east-1a".into(),
        launch_time: 0,
        launch_index: 0,
        key_name: None,
        client_token: None,
        user_data: Some("not base64!".into()),
        tags: Default::default(),
    };
    assert_eq!(user_data(&inst), Some(b"not base64!".to_vec()));
    inst.user_data = Some("aGVs\nbG8=\n".into());
    assert_eq!(user_data(&inst), Some(b"hello".to_vec()));
    inst.user_data = Some(String::new());
    assert_eq!(user_data(&inst), None);
}
