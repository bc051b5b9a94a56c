"""boto3 tests of `enilab serve`: every action, error codes, limits, paging,
filters, concurrency and survival across a restart.

Run: python3 tests/api/test_api.py  (ENILAB_BIN points at the enilab binary)
"""
import http.client
import os
import shutil
import subprocess
import sys
import threading
import unittest
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from botocore.exceptions import ClientError  # noqa: E402

from harness import Daemon, wait_until  # noqa: E402

IMAGE = "ami-0e1ab000000000001"


class Base(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = Daemon()
        cls.ec2 = cls.d.client()

    @classmethod
    def tearDownClass(cls):
        cls.d.close()

    def err(self, code, fn, **kw):
        with self.assertRaises(ClientError) as cm:
            fn(**kw)
        got = cm.exception.response["Error"]["Code"]
        self.assertEqual(got, code, cm.exception.response["Error"].get("Message"))
        self.assertEqual(cm.exception.response["ResponseMetadata"]["HTTPStatusCode"], 400)
        return cm.exception.response["Error"]["Message"]

    def vpc(self, cidr="10.0.0.0/16"):
        return self.ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]

    def subnet(self, vpc, cidr, az=None):
        kw = {"VpcId": vpc, "CidrBlock": cidr}
        if az:
            kw["AvailabilityZone"] = az
        return self.ec2.create_subnet(**kw)["Subnet"]["SubnetId"]

    def launch(self, subnet, itype="t3.micro", **kw):
        r = self.ec2.run_instances(ImageId=IMAGE, InstanceType=itype, MinCount=1, MaxCount=1, SubnetId=subnet, **kw)
        return r["Instances"][0]["InstanceId"]

    def state(self, iid):
        r = self.ec2.describe_instances(InstanceIds=[iid])
        return r["Reservations"][0]["Instances"][0]["State"]["Name"]

    def wait_state(self, iid, name):
        wait_until(lambda: self.state(iid) == name, what="%s %s" % (iid, name))

    def eni(self, eid):
        return self.ec2.describe_network_interfaces(NetworkInterfaceIds=[eid])["NetworkInterfaces"][0]


class VpcSubnetTests(Base):
    def test_vpc_defaults_and_delete(self):
        r = self.ec2.create_vpc(CidrBlock="10.1.0.0/16", TagSpecifications=[
            {"ResourceType": "vpc", "Tags": [{"Key": "Name", "Value": "lab"}]}])["Vpc"]
        v = r["VpcId"]
        self.assertRegex(v, r"^vpc-[0-9a-f]{17}$")
        self.assertEqual(r["Tags"], [{"Key": "Name", "Value": "lab"}])
        rt = self.ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [v]}])["RouteTables"]
        self.assertEqual(len(rt), 1)
        self.assertTrue(rt[0]["Associations"][0]["Main"])
        self.assertEqual(rt[0]["Routes"][0]["GatewayId"], "local")
        self.assertEqual(rt[0]["Routes"][0]["DestinationCidrBlock"], "10.1.0.0/16")
        acls = self.ec2.describe_network_acls(Filters=[{"Name": "vpc-id", "Values": [v]}])["NetworkAcls"]
        self.assertEqual(len(acls), 1)
        self.assertTrue(acls[0]["IsDefault"])
        rules = sorted((e["Egress"], e["RuleNumber"], e["RuleAction"]) for e in acls[0]["Entries"])
        self.assertEqual(rules, [(False, 100, "allow"), (False, 32767, "deny"), (True, 100, "allow"), (True, 32767, "deny")])
        sgs = self.ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [v]}])["SecurityGroups"]
        self.assertEqual([g["GroupName"] for g in sgs], ["default"])
        g = sgs[0]
        self.assertEqual(g["IpPermissions"][0]["UserIdGroupPairs"][0]["GroupId"], g["GroupId"])
        self.assertEqual(g["IpPermissionsEgress"][0]["IpRanges"][0]["CidrIp"], "0.0.0.0/0")
        self.assertEqual(self.ec2.describe_vpcs(Filters=[{"Name": "tag:Name", "Values": ["lab"]}])["Vpcs"][0]["VpcId"], v)
        self.ec2.delete_vpc(VpcId=v)
        self.err("InvalidVpcID.NotFound", self.ec2.describe_vpcs, VpcIds=[v])
        self.assertEqual(self.ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [v]}])["RouteTables"], [])

    def test_vpc_errors(self):
        self.err("InvalidVpc.Range", self.ec2.create_vpc, CidrBlock="10.0.0.0/8")
        self.err("InvalidVpc.Range", self.ec2.create_vpc, CidrBlock="10.0.0.0/29")
        self.err("InvalidParameterValue", self.ec2.create_vpc, CidrBlock="10.0.0.1/16")
        self.err("InvalidParameterValue", self.ec2.create_vpc, CidrBlock="banana")
        self.err("InvalidVpcID.Malformed", self.ec2.describe_vpcs, VpcIds=["vpc-xyz"])
        self.err("InvalidVpcID.NotFound", self.ec2.delete_vpc, VpcId="vpc-0123456789abcdef0")
        self.err("InvalidParameterValue", self.ec2.describe_vpcs, Filters=[{"Name": "bogus", "Values": ["x"]}])

    def test_subnets(self):
        v = self.vpc("10.2.0.0/16")
        s = self.ec2.create_subnet(VpcId=v, CidrBlock="10.2.1.0/24", AvailabilityZone="us-east-1b")["Subnet"]
        self.assertEqual(s["AvailableIpAddressCount"], 251)
        self.assertEqual(s["AvailabilityZone"], "us-east-1b")
        self.assertFalse(s["MapPublicIpOnLaunch"])
        self.err("InvalidSubnet.Conflict", self.ec2.create_subnet, VpcId=v, CidrBlock="10.2.1.128/25")
        self.err("InvalidSubnet.Range", self.ec2.create_subnet, VpcId=v, CidrBlock="10.3.0.0/24")
        self.err("InvalidSubnet.Range", self.ec2.create_subnet, VpcId=v, CidrBlock="10.2.0.0/29")
        self.err("InvalidParameterValue", self.ec2.create_subnet, VpcId=v, CidrBlock="10.2.9.0/24", AvailabilityZone="mars-1a")
        self.ec2.modify_subnet_attribute(SubnetId=s["SubnetId"], MapPublicIpOnLaunch={"Value": True})
        got = self.ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [v]}, {"Name": "availability-zone", "Values": ["us-east-1b"]}])["Subnets"]
        self.assertEqual([x["SubnetId"] for x in got], [s["SubnetId"]])
        self.assertTrue(got[0]["MapPublicIpOnLaunch"])
        self.err("DependencyViolation", self.ec2.delete_vpc, VpcId=v)
        e = self.ec2.create_network_interface(SubnetId=s["SubnetId"])["NetworkInterface"]["NetworkInterfaceId"]
        self.err("DependencyViolation", self.ec2.delete_subnet, SubnetId=s["SubnetId"])
        self.ec2.delete_network_interface(NetworkInterfaceId=e)
        self.ec2.delete_subnet(SubnetId=s["SubnetId"])
        self.err("InvalidSubnetID.NotFound", self.ec2.describe_subnets, SubnetIds=[s["SubnetId"]])
        self.err("InvalidSubnetID.Malformed", self.ec2.delete_subnet, SubnetId="subnet-nothex")
        self.ec2.delete_vpc(VpcId=v)

    def test_paging(self):
        v = self.vpc("10.4.0.0/16")
        made = [self.subnet(v, "10.4.%d.0/24" % i) for i in range(12)]
        seen, token, pages = [], None, 0
        while True:
            kw = {"Filters": [{"Name": "vpc-id", "Values": [v]}], "MaxResults": 5}
            if token:
                kw["NextToken"] = token
            r = self.ec2.describe_subnets(**kw)
            seen += [s["SubnetId"] for s in r["Subnets"]]
            pages += 1
            token = r.get("NextToken")
            if not token:
                break
        self.assertEqual(pages, 3)
        self.assertEqual(sorted(seen), sorted(made))
        pag = self.ec2.get_paginator("describe_subnets")
        ids = [s["SubnetId"] for p in pag.paginate(Filters=[{"Name": "vpc-id", "Values": [v]}], PaginationConfig={"PageSize": 5}) for s in p["Subnets"]]
        self.assertEqual(sorted(ids), sorted(made))
        self.err("InvalidPaginationToken", self.ec2.describe_subnets, MaxResults=5, NextToken="nonsense")


class SecurityGroupTests(Base):
    def test_rules(self):
        v = self.vpc("10.10.0.0/16")
        g = self.ec2.create_security_group(GroupName="web", Description="web tier", VpcId=v)["GroupId"]
        self.err("InvalidGroup.Duplicate", self.ec2.create_security_group, GroupName="web", Description="x", VpcId=v)
        self.err("VPCIdNotSpecified", self.ec2.create_security_group, GroupName="x", Description="x")
        perm = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}
        self.ec2.authorize_security_group_ingress(GroupId=g, IpPermissions=[perm])
        self.err("InvalidPermission.Duplicate", self.ec2.authorize_security_group_ingress, GroupId=g, IpPermissions=[perm])
        self.err("InvalidParameterValue", self.ec2.authorize_security_group_ingress, GroupId=g,
                 IpPermissions=[{"IpProtocol": "tcp", "FromPort": 90, "ToPort": 80, "IpRanges": [{"CidrIp": "1.2.3.0/24"}]}])
        self.err("InvalidParameterValue", self.ec2.authorize_security_group_ingress, GroupId=g,
                 IpPermissions=[{"IpProtocol": "tcp", "FromPort": 1, "ToPort": 2, "IpRanges": [{"CidrIp": "1.2.3.0/33"}]}])
        msg = self.err("InvalidParameterValue", self.ec2.authorize_security_group_ingress, GroupId=g,
                       IpPermissions=[{"IpProtocol": "bogus", "IpRanges": [{"CidrIp": "1.2.3.0/24"}]}])
        self.assertIn("Invalid value 'bogus' for IP protocol. Unknown protocol.", msg)
        other = self.ec2.create_security_group(GroupName="db", Description="db", VpcId=v)["GroupId"]
        self.ec2.authorize_security_group_ingress(GroupId=other, IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "UserIdGroupPairs": [{"GroupId": g}]},
            {"IpProtocol": "icmp", "FromPort": -1, "ToPort": -1, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
            {"IpProtocol": "47", "IpRanges": [{"CidrIp": "10.0.0.0/8"}]},
        ])
        self.ec2.authorize_security_group_egress(GroupId=g, IpPermissions=[
            {"IpProtocol": "udp", "FromPort": 53, "ToPort": 53, "IpRanges": [{"CidrIp": "10.10.0.2/32"}]}])
        d = self.ec2.describe_security_groups(GroupIds=[other])["SecurityGroups"][0]
        protos = sorted(p["IpProtocol"] for p in d["IpPermissions"])
        self.assertEqual(protos, ["47", "icmp", "tcp"])
        by_group = self.ec2.describe_security_groups(Filters=[{"Name": "ip-permission.group-id", "Values": [g]}])["SecurityGroups"]
        self.assertEqual([x["GroupId"] for x in by_group], [other])
        self.assertEqual(self.ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": ["web"]}, {"Name": "vpc-id", "Values": [v]}])["SecurityGroups"][0]["GroupId"], g)
        self.err("DependencyViolation", self.ec2.delete_security_group, GroupId=g)
        self.ec2.revoke_security_group_ingress(GroupId=other, IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "UserIdGroupPairs": [{"GroupId": g}]}])
        self.err("InvalidPermission.NotFound", self.ec2.revoke_security_group_ingress, GroupId=other, IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "UserIdGroupPairs": [{"GroupId": g}]}])
        self.ec2.revoke_security_group_egress(GroupId=g, IpPermissions=[
            {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
        eg = self.ec2.describe_security_groups(GroupIds=[g])["SecurityGroups"][0]["IpPermissionsEgress"]
        self.assertEqual([(p["IpProtocol"], p["FromPort"]) for p in eg], [("udp", 53)])
        default = self.ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [v]}, {"Name": "group-name", "Values": ["default"]}])["SecurityGroups"][0]["GroupId"]
        self.err("CannotDelete", self.ec2.delete_security_group, GroupId=default)
        self.ec2.delete_security_group(GroupId=g)
        self.err("InvalidGroup.NotFound", self.ec2.describe_security_groups, GroupIds=[g])
        self.err("InvalidGroupId.Malformed", self.ec2.describe_security_groups, GroupIds=["sg-!"])

    def test_groups_per_eni(self):
        v = self.vpc("10.11.0.0/16")
        s = self.subnet(v, "10.11.0.0/24")
        gs = [self.ec2.create_security_group(GroupName="g%d" % i, Description="d", VpcId=v)["GroupId"] for i in range(6)]
        e = self.ec2.create_network_interface(SubnetId=s, Groups=gs[:5])["NetworkInterface"]
        self.assertEqual(sorted(x["GroupId"] for x in e["Groups"]), sorted(gs[:5]))
        self.err("SecurityGroupsPerInterfaceExceeded", self.ec2.create_network_interface, SubnetId=s, Groups=gs)
        self.err("SecurityGroupsPerInterfaceExceeded", self.ec2.modify_network_interface_attribute,
                 NetworkInterfaceId=e["NetworkInterfaceId"], Groups=gs)
        self.ec2.modify_network_interface_attribute(NetworkInterfaceId=e["NetworkInterfaceId"], Groups=[gs[5]])
        got = self.ec2.describe_network_interfaces(Filters=[{"Name": "group-id", "Values": [gs[5]]}])["NetworkInterfaces"]
        self.assertEqual([x["NetworkInterfaceId"] for x in got], [e["NetworkInterfaceId"]])
        got = self.ec2.describe_network_interfaces(Filters=[{"Name": "group-name", "Values": ["g5"]}])["NetworkInterfaces"]
        self.assertEqual(len(got), 1)


class RoutingTests(Base):
    def test_route_tables_and_igw(self):
        v = self.vpc("10.20.0.0/16")
        s = self.subnet(v, "10.20.1.0/24")
        igw = self.ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
        rtb = self.ec2.create_route_table(VpcId=v)["RouteTable"]["RouteTableId"]
        self.err("InvalidParameterValue", self.ec2.create_route, RouteTableId=rtb, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
        self.ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=v)
        self.err("Resource.AlreadyAssociated", self.ec2.attach_internet_gateway, InternetGatewayId=igw, VpcId=v)
        self.ec2.create_route(RouteTableId=rtb, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
        self.err("RouteAlreadyExists", self.ec2.create_route, RouteTableId=rtb, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
        e = self.ec2.create_network_interface(SubnetId=s)["NetworkInterface"]["NetworkInterfaceId"]
        self.ec2.create_route(RouteTableId=rtb, DestinationCidrBlock="192.168.0.0/16", NetworkInterfaceId=e)
        # A NAT gateway target must exist (NAT gateways are modelled).
        self.err("InvalidNatGatewayID.NotFound", self.ec2.create_route, RouteTableId=rtb, DestinationCidrBlock="172.16.0.0/12",
                 NatGatewayId="nat-0123456789abcdef0")
        nat = self.ec2.create_nat_gateway(SubnetId=s, ConnectivityType="private")["NatGateway"]["NatGatewayId"]
        self.ec2.create_route(RouteTableId=rtb, DestinationCidrBlock="172.16.0.0/12", NatGatewayId=nat)
        a = self.ec2.associate_route_table(RouteTableId=rtb, SubnetId=s)
        self.assertEqual(a["AssociationState"]["State"], "associated")
        self.err("Resource.AlreadyAssociated", self.ec2.associate_route_table, RouteTableId=rtb, SubnetId=s)
        t = self.ec2.describe_route_tables(RouteTableIds=[rtb])["RouteTables"][0]
        routes = {r["DestinationCidrBlock"]: r for r in t["Routes"]}
        self.assertEqual(routes["10.20.0.0/16"]["GatewayId"], "local")
        self.assertEqual(routes["0.0.0.0/0"]["GatewayId"], igw)
        self.assertEqual(routes["192.168.0.0/16"]["NetworkInterfaceId"], e)
        self.assertEqual(routes["172.16.0.0/12"]["NatGatewayId"], nat)
        got = self.ec2.describe_route_tables(Filters=[{"Name": "association.subnet-id", "Values": [s]}])["RouteTables"]
        self.assertEqual([x["RouteTableId"] for x in got], [rtb])
        got = self.ec2.describe_route_tables(Filters=[{"Name": "route.gateway-id", "Values": [igw]}])["RouteTables"]
        self.assertEqual([x["RouteTableId"] for x in got], [rtb])
        self.err("DependencyViolation", self.ec2.delete_route_table, RouteTableId=rtb)
        self.ec2.delete_route(RouteTableId=rtb, DestinationCidrBlock="0.0.0.0/0")
        self.err("InvalidRoute.NotFound", self.ec2.delete_route, RouteTableId=rtb, DestinationCidrBlock="0.0.0.0/0")
        self.err("InvalidParameterValue", self.ec2.delete_route, RouteTableId=rtb, DestinationCidrBlock="10.20.0.0/16")
        main_assoc = self.ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [v]}, {"Name": "association.main", "Values": ["true"]}])["RouteTables"][0]["Associations"][0]["RouteTableAssociationId"]
        self.err("InvalidParameterValue", self.ec2.disassociate_route_table, AssociationId=main_assoc)
        self.ec2.disassociate_route_table(AssociationId=a["AssociationId"])
        self.err("InvalidAssociationID.NotFound", self.ec2.disassociate_route_table, AssociationId=a["AssociationId"])
        self.ec2.delete_route_table(RouteTableId=rtb)
        self.err("InvalidRouteTableID.NotFound", self.ec2.describe_route_tables, RouteTableIds=[rtb])
        g = self.ec2.describe_internet_gateways(Filters=[{"Name": "attachment.vpc-id", "Values": [v]}])["InternetGateways"]
        self.assertEqual(g[0]["Attachments"], [{"State": "available", "VpcId": v}])
        self.err("DependencyViolation", self.ec2.delete_internet_gateway, InternetGatewayId=igw)
        self.ec2.detach_internet_gateway(InternetGatewayId=igw, VpcId=v)
        self.err("Gateway.NotAttached", self.ec2.detach_internet_gateway, InternetGatewayId=igw, VpcId=v)
        self.ec2.delete_internet_gateway(InternetGatewayId=igw)
        self.err("InvalidInternetGatewayID.NotFound", self.ec2.describe_internet_gateways, InternetGatewayIds=[igw])

    def test_network_acls(self):
        v = self.vpc("10.21.0.0/16")
        s = self.subnet(v, "10.21.1.0/24")
        acl = self.ec2.create_network_acl(VpcId=v)["NetworkAcl"]
        self.assertFalse(acl["IsDefault"])
        self.assertEqual(sorted((e["RuleNumber"], e["RuleAction"]) for e in acl["Entries"]), [(32767, "deny"), (32767, "deny")])
        a = acl["NetworkAclId"]
        self.ec2.create_network_acl_entry(NetworkAclId=a, RuleNumber=100, Protocol="6", RuleAction="allow", Egress=False,
                                          CidrBlock="10.0.0.0/8", PortRange={"From": 22, "To": 22})
        self.err("NetworkAclEntryAlreadyExists", self.ec2.create_network_acl_entry, NetworkAclId=a, RuleNumber=100, Protocol="-1",
                 RuleAction="deny", Egress=False, CidrBlock="0.0.0.0/0")
        self.ec2.create_network_acl_entry(NetworkAclId=a, RuleNumber=100, Protocol="-1", RuleAction="allow", Egress=True, CidrBlock="0.0.0.0/0")
        self.ec2.replace_network_acl_entry(NetworkAclId=a, RuleNumber=100, Protocol="17", RuleAction="deny", Egress=False,
                                           CidrBlock="10.0.0.0/8", PortRange={"From": 53, "To": 53})
        self.err("InvalidNetworkAclEntry.NotFound", self.ec2.replace_network_acl_entry, NetworkAclId=a, RuleNumber=7, Protocol="-1",
                 RuleAction="deny", Egress=False, CidrBlock="0.0.0.0/0")
        self.err("InvalidParameterValue", self.ec2.create_network_acl_entry, NetworkAclId=a, RuleNumber=40000, Protocol="-1",
                 RuleAction="deny", Egress=False, CidrBlock="0.0.0.0/0")
        ent = [e for e in self.ec2.describe_network_acls(NetworkAclIds=[a])["NetworkAcls"][0]["Entries"] if e["RuleNumber"] == 100 and not e["Egress"]][0]
        self.assertEqual((ent["Protocol"], ent["RuleAction"], ent["PortRange"]), ("17", "deny", {"From": 53, "To": 53}))
        self.ec2.delete_network_acl_entry(NetworkAclId=a, RuleNumber=100, Egress=True)
        self.err("InvalidNetworkAclEntry.NotFound", self.ec2.delete_network_acl_entry, NetworkAclId=a, RuleNumber=100, Egress=True)
        default = self.ec2.describe_network_acls(Filters=[{"Name": "vpc-id", "Values": [v]}, {"Name": "default", "Values": ["true"]}])["NetworkAcls"][0]
        assoc = [x for x in default["Associations"] if x["SubnetId"] == s][0]["NetworkAclAssociationId"]
        new = self.ec2.replace_network_acl_association(AssociationId=assoc, NetworkAclId=a)["NewAssociationId"]
        self.assertRegex(new, r"^aclassoc-[0-9a-f]{17}$")
        got = self.ec2.describe_network_acls(Filters=[{"Name": "association.subnet-id", "Values": [s]}])["NetworkAcls"]
        self.assertEqual([x["NetworkAclId"] for x in got], [a])
        self.err("DependencyViolation", self.ec2.delete_network_acl, NetworkAclId=a)
        self.err("InvalidParameterValue", self.ec2.delete_network_acl, NetworkAclId=default["NetworkAclId"])
        self.ec2.replace_network_acl_association(AssociationId=new, NetworkAclId=default["NetworkAclId"])
        self.ec2.delete_network_acl(NetworkAclId=a)
        self.err("InvalidNetworkAclID.NotFound", self.ec2.describe_network_acls, NetworkAclIds=[a])


class EniTests(Base):
    def setUp(self):
        self.v = self.vpc("10.30.0.0/16")
        self.s = self.subnet(self.v, "10.30.%d.0/24" % (len(self.id()) % 200), az="us-east-1a")

    def test_create_describe_attributes(self):
        r = self.ec2.create_network_interface(SubnetId=self.s, Description="first", SecondaryPrivateIpAddressCount=2,
                                              TagSpecifications=[{"ResourceType": "network-interface", "Tags": [{"Key": "role", "Value": "x"}]}])["NetworkInterface"]
        eid = r["NetworkInterfaceId"]
        self.assertRegex(eid, r"^eni-[0-9a-f]{17}$")
        ips = [p["PrivateIpAddress"] for p in r["PrivateIpAddresses"]]
        prefix = ".".join(ips[0].split(".")[:3])
        self.assertEqual(ips, [prefix + ".4", prefix + ".5", prefix + ".6"])
        self.assertTrue(r["PrivateIpAddresses"][0]["Primary"])
        self.assertEqual(r["Status"], "available")
        self.assertRegex(r["MacAddress"], r"^0e(:[0-9a-f]{2}){5}$")
        self.assertEqual(r["TagSet"], [{"Key": "role", "Value": "x"}])
        self.ec2.modify_network_interface_attribute(NetworkInterfaceId=eid, SourceDestCheck={"Value": False})
        self.ec2.modify_network_interface_attribute(NetworkInterfaceId=eid, Description={"Value": "changed"})
        self.assertFalse(self.ec2.describe_network_interface_attribute(NetworkInterfaceId=eid, Attribute="sourceDestCheck")["SourceDestCheck"]["Value"])
        self.assertEqual(self.ec2.describe_network_interface_attribute(NetworkInterfaceId=eid, Attribute="description")["Description"]["Value"], "changed")
        self.assertEqual(len(self.ec2.describe_network_interface_attribute(NetworkInterfaceId=eid, Attribute="groupSet")["Groups"]), 1)
        self.err("InvalidParameterCombination", self.ec2.modify_network_interface_attribute, NetworkInterfaceId=eid,
                 SourceDestCheck={"Value": True}, Description={"Value": "x"})
        for f, val in [("private-ip-address", ips[1]), ("subnet-id", self.s), ("vpc-id", self.v), ("status", "available"),
                       ("availability-zone", "us-east-1a"), ("tag:role", "x"), ("network-interface-id", eid), ("description", "chan*")]:
            got = self.ec2.describe_network_interfaces(Filters=[{"Name": f, "Values": [val]}, {"Name": "subnet-id", "Values": [self.s]}])["NetworkInterfaces"]
            self.assertEqual([x["NetworkInterfaceId"] for x in got], [eid], f)
        self.err("InvalidNetworkInterfaceId.Malformed", self.ec2.describe_network_interfaces, NetworkInterfaceIds=["eni-zz"])
        self.err("InvalidNetworkInterfaceID.NotFound", self.ec2.describe_network_interfaces, NetworkInterfaceIds=["eni-0123456789abcdef0"])
        self.err("InvalidIPAddress.InUse", self.ec2.create_network_interface, SubnetId=self.s, PrivateIpAddress=ips[0])
        self.err("InvalidParameterValue", self.ec2.create_network_interface, SubnetId=self.s, PrivateIpAddress=prefix + ".1")
        self.err("InvalidParameterValue", self.ec2.assign_ipv6_addresses, NetworkInterfaceId=eid, Ipv6AddressCount=1)
        self.ec2.delete_network_interface(NetworkInterfaceId=eid)
        self.err("InvalidNetworkInterfaceID.NotFound", self.ec2.delete_network_interface, NetworkInterfaceId=eid)

    def test_private_ips_prefixes_and_reassignment(self):
        a = self.ec2.create_network_interface(SubnetId=self.s)["NetworkInterface"]["NetworkInterfaceId"]
        b = self.ec2.create_network_interface(SubnetId=self.s)["NetworkInterface"]["NetworkInterfaceId"]
        r = self.ec2.assign_private_ip_addresses(NetworkInterfaceId=a, SecondaryPrivateIpAddressCount=2)
        sec = [x["PrivateIpAddress"] for x in r["AssignedPrivateIpAddresses"]]
        self.assertEqual(len(sec), 2)
        self.err("InvalidIPAddress.InUse", self.ec2.assign_private_ip_addresses, NetworkInterfaceId=b, PrivateIpAddresses=[sec[0]])
        self.ec2.assign_private_ip_addresses(NetworkInterfaceId=b, PrivateIpAddresses=[sec[0]], AllowReassignment=True)
        self.assertIn(sec[0], [x["PrivateIpAddress"] for x in self.eni(b)["PrivateIpAddresses"]])
        self.assertNotIn(sec[0], [x["PrivateIpAddress"] for x in self.eni(a)["PrivateIpAddresses"]])
        self.err("InvalidParameterValue", self.ec2.assign_private_ip_addresses, NetworkInterfaceId=b,
                 PrivateIpAddresses=[self.eni(a)["PrivateIpAddress"]], AllowReassignment=True)
        p = self.ec2.assign_private_ip_addresses(NetworkInterfaceId=a, Ipv4PrefixCount=1)["AssignedIpv4Prefixes"][0]["Ipv4Prefix"]
        self.assertTrue(p.endswith("/28"))
        self.assertEqual(int(p.split("/")[0].split(".")[3]) % 16, 0)
        self.assertEqual([x["Ipv4Prefix"] for x in self.eni(a)["Ipv4Prefixes"]], [p])
        self.err("InvalidParameterCombination", self.ec2.assign_private_ip_addresses, NetworkInterfaceId=a,
                 SecondaryPrivateIpAddressCount=1, Ipv4PrefixCount=1)
        self.ec2.unassign_private_ip_addresses(NetworkInterfaceId=a, Ipv4Prefixes=[p])
        self.ec2.unassign_private_ip_addresses(NetworkInterfaceId=b, PrivateIpAddresses=[sec[0]])
        self.err("InvalidParameterValue", self.ec2.unassign_private_ip_addresses, NetworkInterfaceId=b, PrivateIpAddresses=[sec[0]])
        self.err("InvalidParameterValue", self.ec2.unassign_private_ip_addresses, NetworkInterfaceId=b,
                 PrivateIpAddresses=[self.eni(b)["PrivateIpAddress"]])

    def test_subnet_exhaustion(self):
        s = self.subnet(self.v, "10.30.250.0/28")  # 16 - 5 reserved = 11 usable
        self.assertEqual(self.ec2.describe_subnets(SubnetIds=[s])["Subnets"][0]["AvailableIpAddressCount"], 11)
        self.ec2.create_network_interface(SubnetId=s, SecondaryPrivateIpAddressCount=9)
        e = self.ec2.create_network_interface(SubnetId=s)["NetworkInterface"]
        self.assertEqual(e["PrivateIpAddress"], "10.30.250.14")
        self.err("InsufficientFreeAddressesInSubnet", self.ec2.create_network_interface, SubnetId=s)
        self.assertEqual(self.ec2.describe_subnets(SubnetIds=[s])["Subnets"][0]["AvailableIpAddressCount"], 0)


class InstanceTests(Base):
    def setUp(self):
        self.v = self.vpc("10.40.0.0/16")
        self.s = self.subnet(self.v, "10.40.%d.0/24" % (len(self.id()) % 200))

    def test_images(self):
        imgs = self.ec2.describe_images(Owners=["self"])["Images"]
        self.assertEqual([i["ImageId"] for i in imgs], [IMAGE])
        self.assertEqual(imgs[0]["Name"], "enilab-guest")
        self.err("InvalidAMIID.NotFound", self.ec2.describe_images, ImageIds=["ami-0123456789abcdef0"])
        self.err("InvalidAMIID.Malformed", self.ec2.describe_images, ImageIds=["ami-x"])
        self.err("InvalidAMIID.NotFound", self.ec2.run_instances, ImageId="ami-0123456789abcdef0", MinCount=1, MaxCount=1, SubnetId=self.s)

    def test_lifecycle(self):
        r = self.ec2.run_instances(ImageId=IMAGE, InstanceType="m5.large", MinCount=2, MaxCount=2, SubnetId=self.s,
                                   TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": "web"}]}])
        ids = [i["InstanceId"] for i in r["Instances"]]
        self.assertEqual(len(ids), 2)
        for i in r["Instances"]:
            self.assertEqual(i["State"]["Name"], "pending")
            self.assertRegex(i["InstanceId"], r"^i-[0-9a-f]{17}$")
            ni = i["NetworkInterfaces"][0]
            self.assertEqual((ni["Attachment"]["DeviceIndex"], ni["Attachment"]["NetworkCardIndex"]), (0, 0))
            self.assertTrue(ni["Attachment"]["DeleteOnTermination"])
        for i in ids:
            self.wait_state(i, "running")
        self.ec2.get_waiter("instance_running").wait(InstanceIds=ids, WaiterConfig={"Delay": 1, "MaxAttempts": 10})
        got = self.ec2.describe_instances(Filters=[{"Name": "tag:Name", "Values": ["web"]}, {"Name": "subnet-id", "Values": [self.s]}])
        self.assertEqual(sorted(i["InstanceId"] for rr in got["Reservations"] for i in rr["Instances"]), sorted(ids))
        st = self.ec2.stop_instances(InstanceIds=[ids[0]])["StoppingInstances"][0]
        self.assertEqual((st["PreviousState"]["Name"], st["CurrentState"]["Name"]), ("running", "stopping"))
        self.wait_state(ids[0], "stopped")
        got = self.ec2.describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["stopped"]}, {"Name": "vpc-id", "Values": [self.v]}])
        self.assertEqual([i["InstanceId"] for rr in got["Reservations"] for i in rr["Instances"]], [ids[0]])
        self.ec2.start_instances(InstanceIds=[ids[0]])
        self.wait_state(ids[0], "running")
        primary = self.ec2.describe_instances(InstanceIds=[ids[1]])["Reservations"][0]["Instances"][0]["NetworkInterfaces"][0]["NetworkInterfaceId"]
        t = self.ec2.terminate_instances(InstanceIds=ids)["TerminatingInstances"]
        self.assertEqual({x["CurrentState"]["Name"] for x in t}, {"shutting-down"})
        for i in ids:
            self.wait_state(i, "terminated")
        self.err("InvalidNetworkInterfaceID.NotFound", self.ec2.describe_network_interfaces, NetworkInterfaceIds=[primary])
        self.err("IncorrectInstanceState", self.ec2.start_instances, InstanceIds=[ids[0]])
        self.err("InvalidInstanceID.NotFound", self.ec2.stop_instances, InstanceIds=["i-0123456789abcdef0"])
        self.err("InvalidInstanceID.Malformed", self.ec2.describe_instances, InstanceIds=["i-zz"])

    def test_run_errors(self):
        self.err("InvalidParameterValue", self.ec2.run_instances, ImageId=IMAGE, InstanceType="x9.huge", MinCount=1, MaxCount=1, SubnetId=self.s)
        self.err("VPCIdNotSpecified", self.ec2.run_instances, ImageId=IMAGE, MinCount=1, MaxCount=1)
        self.err("InvalidParameterValue", self.ec2.run_instances, ImageId=IMAGE, MinCount=3, MaxCount=2, SubnetId=self.s)
        self.err("InvalidSubnetID.NotFound", self.ec2.run_instances, ImageId=IMAGE, MinCount=1, MaxCount=1, SubnetId="subnet-0123456789abcdef0")

    def test_attach_detach_limits(self):
        i = self.launch(self.s, "t3.micro")
        self.wait_state(i, "running")
        inst = self.ec2.describe_instances(InstanceIds=[i])["Reservations"][0]["Instances"][0]
        att0 = inst["NetworkInterfaces"][0]["Attachment"]["AttachmentId"]
        msg = self.err("OperationNotPermitted", self.ec2.detach_network_interface, AttachmentId=att0)
        self.assertEqual(msg, "The network interface at device index 0 and networkCard index 0 cannot be detached.")
        e1 = self.ec2.create_network_interface(SubnetId=self.s)["NetworkInterface"]["NetworkInterfaceId"]
        e2 = self.ec2.create_network_interface(SubnetId=self.s)["NetworkInterface"]["NetworkInterfaceId"]
        self.err("InvalidParameterValue", self.ec2.attach_network_interface, NetworkInterfaceId=e1, InstanceId=i, DeviceIndex=0)
        self.err("InvalidParameterValue", self.ec2.attach_network_interface, NetworkInterfaceId=e1, InstanceId=i, DeviceIndex=1, NetworkCardIndex=1)
        r = self.ec2.attach_network_interface(NetworkInterfaceId=e1, InstanceId=i, DeviceIndex=1, EnaQueueCount=2)
        self.assertRegex(r["AttachmentId"], r"^eni-attach-[0-9a-f]{17}$")
        self.assertEqual(r["NetworkCardIndex"], 0)
        wait_until(lambda: self.eni(e1)["Attachment"]["Status"] == "attached", what="attached")
        a = self.eni(e1)["Attachment"]
        self.assertEqual((a["InstanceId"], a["DeviceIndex"], a["EnaQueueCount"], a["DeleteOnTermination"]), (i, 1, 2, False))
        self.assertEqual(self.eni(e1)["Status"], "in-use")
        self.err("InvalidNetworkInterface.InUse", self.ec2.attach_network_interface, NetworkInterfaceId=e1, InstanceId=i, DeviceIndex=2)
        self.err("InvalidNetworkInterface.InUse", self.ec2.delete_network_interface, NetworkInterfaceId=e1)
        self.err("AttachmentLimitExceeded", self.ec2.attach_network_interface, NetworkInterfaceId=e2, InstanceId=i, DeviceIndex=2)
        got = self.ec2.describe_network_interfaces(Filters=[{"Name": "attachment.instance-id", "Values": [i]}])["NetworkInterfaces"]
        self.assertEqual(len(got), 2)
        self.ec2.modify_network_interface_attribute(NetworkInterfaceId=e1, Attachment={"AttachmentId": r["AttachmentId"], "DeleteOnTermination": True})
        self.assertTrue(self.eni(e1)["Attachment"]["DeleteOnTermination"])
        # t3.micro: 2 addresses per interface.
        self.ec2.assign_private_ip_addresses(NetworkInterfaceId=e1, SecondaryPrivateIpAddressCount=1)
        self.err("PrivateIpAddressLimitExceeded", self.ec2.assign_private_ip_addresses, NetworkInterfaceId=e1, SecondaryPrivateIpAddressCount=1)
        self.ec2.detach_network_interface(AttachmentId=r["AttachmentId"])
        wait_until(lambda: "Attachment" not in self.eni(e1), what="detached")
        self.assertEqual(self.eni(e1)["Status"], "available")
        self.err("InvalidAttachmentID.NotFound", self.ec2.detach_network_interface, AttachmentId=r["AttachmentId"])
        # Force detach, and a stopped (warm) attach.
        self.ec2.stop_instances(InstanceIds=[i])
        self.wait_state(i, "stopped")
        r2 = self.ec2.attach_network_interface(NetworkInterfaceId=e2, InstanceId=i, DeviceIndex=1)
        wait_until(lambda: self.eni(e2)["Attachment"]["Status"] == "attached", what="warm attach")
        self.ec2.detach_network_interface(AttachmentId=r2["AttachmentId"], Force=True)
        wait_until(lambda: "Attachment" not in self.eni(e2), what="forced detach")
        # Too many addresses for the type.
        big = self.ec2.create_network_interface(SubnetId=self.s, SecondaryPrivateIpAddressCount=2)["NetworkInterface"]["NetworkInterfaceId"]
        self.err("PrivateIpAddressLimitExceeded", self.ec2.attach_network_interface, NetworkInterfaceId=big, InstanceId=i, DeviceIndex=1)
        # Other VPC / other AZ.
        v2 = self.vpc("10.41.0.0/16")
        s2 = self.subnet(v2, "10.41.0.0/24")
        far = self.ec2.create_network_interface(SubnetId=s2)["NetworkInterface"]["NetworkInterfaceId"]
        self.err("InvalidParameterValue", self.ec2.attach_network_interface, NetworkInterfaceId=far, InstanceId=i, DeviceIndex=1)
        s3 = self.subnet(self.v, "10.40.222.0/24", az="us-east-1c")
        other_az = self.ec2.create_network_interface(SubnetId=s3)["NetworkInterface"]["NetworkInterfaceId"]
        self.err("InvalidParameterCombination", self.ec2.attach_network_interface, NetworkInterfaceId=other_az, InstanceId=i, DeviceIndex=1)
        self.ec2.terminate_instances(InstanceIds=[i])
        self.wait_state(i, "terminated")
        self.err("IncorrectInstanceState", self.ec2.attach_network_interface, NetworkInterfaceId=e2, InstanceId=i, DeviceIndex=1)

    def test_multi_card_types(self):
        i = self.launch(self.s, "c6in.32xlarge")
        self.wait_state(i, "running")
        enis = [self.ec2.create_network_interface(SubnetId=self.s)["NetworkInterface"]["NetworkInterfaceId"] for _ in range(9)]
        # 8 per card on c6in.32xlarge: card 1 takes indexes 0..7.
        for n, e in enumerate(enis[:8]):
            self.ec2.attach_network_interface(NetworkInterfaceId=e, InstanceId=i, DeviceIndex=n, NetworkCardIndex=1)
        self.err("AttachmentLimitExceeded", self.ec2.attach_network_interface, NetworkInterfaceId=enis[8], InstanceId=i, DeviceIndex=8, NetworkCardIndex=1)
        self.err("InvalidParameterValue", self.ec2.attach_network_interface, NetworkInterfaceId=enis[8], InstanceId=i, DeviceIndex=1, NetworkCardIndex=2)
        self.ec2.attach_network_interface(NetworkInterfaceId=enis[8], InstanceId=i, DeviceIndex=1, NetworkCardIndex=0)
        got = self.ec2.describe_network_interfaces(Filters=[{"Name": "attachment.instance-id", "Values": [i]},
                                                           {"Name": "attachment.network-card-index", "Values": ["1"]}])["NetworkInterfaces"]
        self.assertEqual(len(got), 8)
        # Launch with two cards at once on p4d.24xlarge.
        r = self.ec2.run_instances(ImageId=IMAGE, InstanceType="p4d.24xlarge", MinCount=1, MaxCount=1, NetworkInterfaces=[
            {"DeviceIndex": 0, "NetworkCardIndex": 0, "SubnetId": self.s},
            {"DeviceIndex": 0, "NetworkCardIndex": 3, "SubnetId": self.s, "EnaQueueCount": 4},
        ])["Instances"][0]
        self.assertEqual(sorted(n["Attachment"]["NetworkCardIndex"] for n in r["NetworkInterfaces"]), [0, 3])
        self.err("AttachmentLimitExceeded", self.ec2.run_instances, ImageId=IMAGE, InstanceType="t3.micro", MinCount=1, MaxCount=1, NetworkInterfaces=[
            {"DeviceIndex": n, "SubnetId": self.s} for n in range(3)])


class AddressTests(Base):
    def test_elastic_ips(self):
        v = self.vpc("10.50.0.0/16")
        s = self.subnet(v, "10.50.0.0/24")
        e = self.ec2.create_network_interface(SubnetId=s, SecondaryPrivateIpAddressCount=1)["NetworkInterface"]
        eid = e["NetworkInterfaceId"]
        sec = e["PrivateIpAddresses"][1]["PrivateIpAddress"]
        a = self.ec2.allocate_address(Domain="vpc")
        self.assertTrue(a["PublicIp"].startswith("203.0.113."))
        self.assertRegex(a["AllocationId"], r"^eipalloc-[0-9a-f]{17}$")
        self.err("Gateway.NotAttached", self.ec2.associate_address, AllocationId=a["AllocationId"], NetworkInterfaceId=eid)
        igw = self.ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
        self.ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=v)
        assoc = self.ec2.associate_address(AllocationId=a["AllocationId"], NetworkInterfaceId=eid, PrivateIpAddress=sec)["AssociationId"]
        self.assertRegex(assoc, r"^eipassoc-[0-9a-f]{17}$")
        other = self.ec2.create_network_interface(SubnetId=s)["NetworkInterface"]["NetworkInterfaceId"]
        self.err("Resource.AlreadyAssociated", self.ec2.associate_address, AllocationId=a["AllocationId"], NetworkInterfaceId=other)
        d = self.ec2.describe_addresses(AllocationIds=[a["AllocationId"]])["Addresses"][0]
        self.assertEqual((d["NetworkInterfaceId"], d["PrivateIpAddress"], d["AssociationId"]), (eid, sec, assoc))
        self.assertEqual(self.ec2.describe_addresses(Filters=[{"Name": "network-interface-id", "Values": [eid]}])["Addresses"][0]["PublicIp"], a["PublicIp"])
        p = [x for x in self.eni(eid)["PrivateIpAddresses"] if x["PrivateIpAddress"] == sec][0]
        self.assertEqual(p["Association"]["PublicIp"], a["PublicIp"])
        # AllowReassignment carries the Elastic IP with the private address.
        self.ec2.assign_private_ip_addresses(NetworkInterfaceId=other, PrivateIpAddresses=[sec], AllowReassignment=True)
        self.assertEqual(self.ec2.describe_addresses(AllocationIds=[a["AllocationId"]])["Addresses"][0]["NetworkInterfaceId"], other)
        self.err("InvalidIPAddress.InUse", self.ec2.release_address, AllocationId=a["AllocationId"])
        self.err("DependencyViolation", self.ec2.detach_internet_gateway, InternetGatewayId=igw, VpcId=v)
        new = self.ec2.associate_address(AllocationId=a["AllocationId"], NetworkInterfaceId=eid, AllowReassociation=True)["AssociationId"]
        self.ec2.disassociate_address(AssociationId=new)
        self.err("InvalidAssociationID.NotFound", self.ec2.disassociate_address, AssociationId=new)
        self.ec2.release_address(AllocationId=a["AllocationId"])
        self.err("InvalidAllocationID.NotFound", self.ec2.describe_addresses, AllocationIds=[a["AllocationId"]])
        self.err("InvalidAllocationID.NotFound", self.ec2.release_address, AllocationId=a["AllocationId"])
        self.err("InvalidParameterValue", self.ec2.allocate_address, Domain="vpc", Address="198.51.100.1")


class PublicIpTests(Base):
    """Public IPv4 addresses at launch, from the Elastic IP pool."""

    POOL = "198.51.100."

    @classmethod
    def setUpClass(cls):
        cls.d = Daemon(extra=["--public-pool", "198.51.100.0/28"])
        cls.ec2 = cls.d.client()

    def inst(self, iid):
        return self.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]

    def public(self, iid):
        return self.inst(iid).get("PublicIpAddress")

    def run_nic(self, **nic):
        nic.setdefault("DeviceIndex", 0)
        r = self.ec2.run_instances(ImageId=IMAGE, MinCount=1, MaxCount=1, NetworkInterfaces=[nic])
        return r["Instances"][0]["InstanceId"]

    def test_launch_stop_start_and_overrides(self):
        v = self.vpc("10.61.0.0/16")
        on = self.subnet(v, "10.61.1.0/24")
        off = self.subnet(v, "10.61.2.0/24")
        self.ec2.modify_subnet_attribute(SubnetId=on, MapPublicIpOnLaunch={"Value": True})
        a = self.launch(on)
        ip = self.public(a)
        self.assertTrue(ip and ip.startswith(self.POOL), ip)
        i = self.inst(a)
        ni = i["NetworkInterfaces"][0]
        self.assertEqual(ni["Association"]["PublicIp"], ip)
        self.assertEqual(ni["Association"]["IpOwnerId"], "amazon")
        self.assertEqual(ni["PrivateIpAddresses"][0]["Association"]["PublicIp"], ip)
        e = self.eni(ni["NetworkInterfaceId"])
        self.assertEqual((e["Association"]["PublicIp"], e["Association"]["IpOwnerId"]), (ip, "amazon"))
        self.assertNotIn("AllocationId", e["Association"])
        self.assertEqual(self.ec2.describe_addresses()["Addresses"], [], "not an allocation")
        got = self.ec2.describe_instances(Filters=[{"Name": "ip-address", "Values": [ip]}])["Reservations"]
        self.assertEqual([x["InstanceId"] for r in got for x in r["Instances"]], [a])
        got = self.ec2.describe_network_interfaces(Filters=[{"Name": "association.public-ip", "Values": [ip]}])["NetworkInterfaces"]
        self.assertEqual([x["NetworkInterfaceId"] for x in got], [ni["NetworkInterfaceId"]])

        b = self.launch(off)
        self.assertIsNone(self.public(b))
        self.assertNotIn("Association", self.inst(b)["NetworkInterfaces"][0])
        # AssociatePublicIpAddress overrides the subnet both ways.
        c = self.run_nic(SubnetId=off, AssociatePublicIpAddress=True)
        self.assertTrue(self.public(c).startswith(self.POOL))
        dd = self.run_nic(SubnetId=on, AssociatePublicIpAddress=False)
        self.assertIsNone(self.public(dd))
        self.assertNotEqual(self.public(a), self.public(c))
        # AWS's restrictions on the parameter.
        self.err("InvalidParameterCombination", self.ec2.run_instances, ImageId=IMAGE, InstanceType="m5.large", MinCount=1, MaxCount=1,
                 NetworkInterfaces=[{"DeviceIndex": 0, "SubnetId": off}, {"DeviceIndex": 1, "SubnetId": off, "AssociatePublicIpAddress": True}])
        self.err("InvalidParameterCombination", self.ec2.run_instances, ImageId=IMAGE, InstanceType="m5.large", MinCount=1, MaxCount=1,
                 NetworkInterfaces=[{"DeviceIndex": 0, "SubnetId": off, "AssociatePublicIpAddress": True}, {"DeviceIndex": 1, "SubnetId": off}])
        spare = self.ec2.create_network_interface(SubnetId=on)["NetworkInterface"]["NetworkInterfaceId"]
        self.err("InvalidParameterCombination", self.run_nic, NetworkInterfaceId=spare, AssociatePublicIpAddress=True)
        # An existing interface at device 0 gets none, even in a mapping subnet.
        x = self.run_nic(NetworkInterfaceId=spare)
        self.assertIsNone(self.public(x))
        # Two interfaces at launch: no public IP even in a mapping subnet.
        two = self.ec2.run_instances(ImageId=IMAGE, InstanceType="m5.large", MinCount=1, MaxCount=1,
                                     NetworkInterfaces=[{"DeviceIndex": 0, "SubnetId": on}, {"DeviceIndex": 1, "SubnetId": on}])["Instances"][0]["InstanceId"]
        self.assertIsNone(self.public(two))

        # Stop releases the address, start hands out one again.
        self.wait_state(a, "running")
        self.ec2.stop_instances(InstanceIds=[a])
        self.assertIsNone(self.public(a))
        self.wait_state(a, "stopped")
        self.assertIsNone(self.public(a))
        self.assertNotIn("Association", self.inst(a)["NetworkInterfaces"][0])
        self.ec2.start_instances(InstanceIds=[a])
        self.wait_state(a, "running")
        self.assertTrue(self.public(a).startswith(self.POOL))

        # An Elastic IP on the primary address replaces it; disassociating
        # gives a launch address back.
        igw = self.ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
        self.ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=v)
        launch_ip = self.public(c)
        eip = self.ec2.allocate_address(Domain="vpc")
        self.assertNotIn(eip["PublicIp"], [self.public(a), launch_ip])
        assoc = self.ec2.associate_address(AllocationId=eip["AllocationId"], InstanceId=c)["AssociationId"]
        self.assertEqual(self.public(c), eip["PublicIp"])
        self.assertNotEqual(self.inst(c)["NetworkInterfaces"][0]["Association"]["IpOwnerId"], "amazon")
        self.ec2.disassociate_address(AssociationId=assoc)
        back = self.public(c)
        self.assertTrue(back and back.startswith(self.POOL) and back != eip["PublicIp"], back)
        self.ec2.release_address(AllocationId=eip["AllocationId"])

        ids = [a, b, c, dd, x, two]
        self.ec2.terminate_instances(InstanceIds=ids)
        for i in ids:
            self.assertIsNone(self.public(i))
            self.wait_state(i, "terminated")
        # The kept interface (not delete-on-termination) has no address.
        self.assertNotIn("Association", self.eni(spare))

    def test_pool_is_shared_released_at_terminate_and_durable(self):
        # .2-.6 usable (.1 is the internet host); three taken by Elastic IPs.
        d = Daemon(extra=["--public-pool", "192.0.2.0/29"])
        try:
            ec2 = d.client()
            taken = [ec2.allocate_address(Domain="vpc")["PublicIp"] for _ in range(3)]
            self.assertEqual(taken, ["192.0.2.2", "192.0.2.3", "192.0.2.4"])
            v = ec2.create_vpc(CidrBlock="10.62.0.0/16")["Vpc"]["VpcId"]
            s = ec2.create_subnet(VpcId=v, CidrBlock="10.62.1.0/24")["Subnet"]["SubnetId"]
            ec2.modify_subnet_attribute(SubnetId=s, MapPublicIpOnLaunch={"Value": True})

            def run():
                return ec2.run_instances(ImageId=IMAGE, MinCount=1, MaxCount=1, SubnetId=s)["Instances"][0]["InstanceId"]

            def pub(i):
                return ec2.describe_instances(InstanceIds=[i])["Reservations"][0]["Instances"][0].get("PublicIpAddress")

            def state(i):
                return ec2.describe_instances(InstanceIds=[i])["Reservations"][0]["Instances"][0]["State"]["Name"]

            a, b = run(), run()
            self.assertEqual(sorted([pub(a), pub(b)]), ["192.0.2.5", "192.0.2.6"])
            # The pool is full: no third launch, no Elastic IP, nothing left behind.
            with self.assertRaises(ClientError) as cm:
                run()
            self.assertEqual(cm.exception.response["Error"]["Code"], "AddressLimitExceeded")
            with self.assertRaises(ClientError) as cm:
                ec2.allocate_address(Domain="vpc")
            self.assertEqual(cm.exception.response["Error"]["Code"], "AddressLimitExceeded")
            with self.assertRaises(ClientError) as cm:
                ec2.allocate_address(Domain="vpc", Address=pub(a))
            self.assertEqual(cm.exception.response["Error"]["Code"], "InvalidAddress.InUse")
            insts = [x for r in ec2.describe_instances()["Reservations"] for x in r["Instances"]]
            self.assertEqual(len(insts), 2)
            # Terminating frees the address for the next launch.
            freed = pub(a)
            ec2.terminate_instances(InstanceIds=[a])
            wait_until(lambda: state(a) == "terminated")
            c = run()
            self.assertEqual(pub(c), freed)
            wait_until(lambda: state(c) == "running")
            # Survives a kill: same addresses, and they still count as used.
            before = (pub(b), pub(c))
            d.restart()
            ec2 = d.client()
            self.assertEqual((pub(b), pub(c)), before)
            eni = ec2.describe_instances(InstanceIds=[c])["Reservations"][0]["Instances"][0]["NetworkInterfaces"][0]
            self.assertEqual(eni["Association"]["PublicIp"], before[1])
            with self.assertRaises(ClientError) as cm:
                ec2.allocate_address(Domain="vpc")
            self.assertEqual(cm.exception.response["Error"]["Code"], "AddressLimitExceeded")
            # Stopping releases it: now an Elastic IP can take it.
            ec2.stop_instances(InstanceIds=[c])
            wait_until(lambda: state(c) == "stopped")
            self.assertEqual(ec2.allocate_address(Domain="vpc")["PublicIp"], before[1])
            # Starting with the pool full fails and leaves the instance stopped.
            with self.assertRaises(ClientError) as cm:
                ec2.start_instances(InstanceIds=[c])
            self.assertEqual(cm.exception.response["Error"]["Code"], "AddressLimitExceeded")
            self.assertEqual(state(c), "stopped")
        finally:
            d.close()


class FlowLogTagTests(Base):
    def test_flow_logs(self):
        v = self.vpc("10.60.0.0/16")
        s = self.subnet(v, "10.60.0.0/24")
        r = self.ec2.create_flow_logs(ResourceIds=[v, s, "vpc-0123456789abcdef0"], ResourceType="VPC", TrafficType="ALL",
                                      LogDestinationType="file", LogDestination="/tmp/enilab-flows.log", MaxAggregationInterval=60)
        self.assertEqual(len(r["FlowLogIds"]), 1)
        self.assertEqual(sorted(u["ResourceId"] for u in r["Unsuccessful"]), sorted([s, "vpc-0123456789abcdef0"]))
        fl = r["FlowLogIds"][0]
        self.assertRegex(fl, r"^fl-[0-9a-f]{17}$")
        r2 = self.ec2.create_flow_logs(ResourceIds=[s], ResourceType="Subnet", TrafficType="REJECT", LogDestination="/tmp/enilab-rej.log")
        d = self.ec2.describe_flow_logs(FlowLogIds=[fl])["FlowLogs"][0]
        self.assertEqual((d["ResourceId"], d["TrafficType"], d["LogDestinationType"], d["LogDestination"], d["MaxAggregationInterval"]),
                         (v, "ALL", "file", "/tmp/enilab-flows.log", 60))
        self.assertIn("${srcaddr}", d["LogFormat"])
        got = self.ec2.describe_flow_logs(Filters=[{"Name": "resource-id", "Values": [s]}])["FlowLogs"]
        self.assertEqual([x["FlowLogId"] for x in got], r2["FlowLogIds"])
        self.err("InvalidParameterValue", self.ec2.create_flow_logs, ResourceIds=[v], ResourceType="VPC", TrafficType="ALL",
                 LogDestination="/tmp/x", MaxAggregationInterval=30)
        self.err("InvalidParameterValue", self.ec2.create_flow_logs, ResourceIds=[v], ResourceType="VPC", TrafficType="SOME", LogDestination="/tmp/x")
        self.err("InvalidParameterValue", self.ec2.create_flow_logs, ResourceIds=[v], ResourceType="VPC", TrafficType="ALL", LogDestination="relative/path")
        self.err("InvalidParameterValue", self.ec2.create_flow_logs, ResourceIds=[v], ResourceType="VPC", TrafficType="ALL",
                 LogDestinationType="s3", LogDestination="arn:aws:s3:::bucket")
        dup = self.ec2.create_flow_logs(ResourceIds=[v], ResourceType="VPC", TrafficType="ALL", LogDestination="/tmp/enilab-flows.log")
        self.assertEqual(dup["Unsuccessful"][0]["Error"]["Code"], "FlowLogAlreadyExists")
        r = self.ec2.delete_flow_logs(FlowLogIds=[fl, "fl-0123456789abcdef0"])
        self.assertEqual([u["ResourceId"] for u in r["Unsuccessful"]], ["fl-0123456789abcdef0"])
        self.assertEqual(self.ec2.describe_flow_logs(FlowLogIds=[fl])["FlowLogs"], [])

    def test_tags(self):
        v = self.vpc("10.61.0.0/16")
        s = self.subnet(v, "10.61.0.0/24")
        self.ec2.create_tags(Resources=[v, s], Tags=[{"Key": "env", "Value": "lab"}, {"Key": "team", "Value": "net"}])
        self.assertEqual(sorted(t["Key"] for t in self.ec2.describe_subnets(SubnetIds=[s])["Subnets"][0]["Tags"]), ["env", "team"])
        got = self.ec2.describe_vpcs(Filters=[{"Name": "tag-key", "Values": ["team"]}, {"Name": "vpc-id", "Values": [v]}])["Vpcs"]
        self.assertEqual(len(got), 1)
        self.ec2.delete_tags(Resources=[s], Tags=[{"Key": "env", "Value": "other"}])
        self.assertEqual(len(self.ec2.describe_subnets(SubnetIds=[s])["Subnets"][0]["Tags"]), 2)
        self.ec2.delete_tags(Resources=[s], Tags=[{"Key": "env"}])
        self.assertEqual([t["Key"] for t in self.ec2.describe_subnets(SubnetIds=[s])["Subnets"][0]["Tags"]], ["team"])
        tags = self.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [v]}])["Tags"]
        self.assertEqual(sorted(t["Key"] for t in tags), ["env", "team"])
        self.assertEqual(tags[0]["ResourceType"], "vpc")
        self.err("InvalidVpcID.NotFound", self.ec2.create_tags, Resources=["vpc-0123456789abcdef0"], Tags=[{"Key": "a", "Value": "b"}])
        self.err("InvalidID", self.ec2.create_tags, Resources=["bogus-1"], Tags=[{"Key": "a", "Value": "b"}])
        self.err("InvalidParameterValue", self.ec2.create_tags, Resources=[v], Tags=[{"Key": "aws:x", "Value": "b"}])
        self.err("TagLimitExceeded", self.ec2.create_tags, Resources=[v], Tags=[{"Key": "k%d" % i, "Value": "v"} for i in range(51)])
        self.err("InvalidParameterValue", self.ec2.create_vpc, CidrBlock="10.62.0.0/16",
                 TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "a", "Value": "b"}]}])


class RawProtocolTests(Base):
    """Bad input straight over HTTP: always EC2 error XML, never a crash."""

    def post(self, body, method="POST", path="/", headers=None):
        u = urllib.parse.urlparse(self.d.endpoint)
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        h = {"Content-Type": "application/x-www-form-urlencoded"}
        h.update(headers or {})
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read().decode("utf-8", "replace")
        c.close()
        return r.status, data

    def oversized(self, chunked):
        """Send a 2 MiB body (declared, or chunked) from a thread that
        ignores the server hanging up; return the status and body."""
        import socket
        u = urllib.parse.urlparse(self.d.endpoint)
        sock = socket.create_connection((u.hostname, u.port), timeout=10)
        size = 2 << 20
        if chunked:
            head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        else:
            head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size

        def send():
            try:
                sock.sendall(head)
                for _ in range(size // 65536):
                    piece = b"a" * 65536
                    sock.sendall((b"10000\r\n" + piece + b"\r\n") if chunked else piece)
            except OSError:
                pass

        t = threading.Thread(target=send)
        t.start()
        data = b""
        try:
            while b"</Response>" not in data:
                got = sock.recv(65536)
                if not got:
                    break
                data += got
        except OSError:
            pass
        t.join()
        sock.close()
        text = data.decode("utf-8", "replace")
        status = int(text.split()[1]) if text.startswith("HTTP/1.1") else 0
        return status, text

    def code(self, body, **kw):
        st, data = self.post(body, **kw)
        self.assertIn("<Response><Errors><Error><Code>", data)
        self.assertIn("<RequestID>", data)
        return st, data.split("<Code>")[1].split("</Code>")[0]

    def test_garbage(self):
        cases = [
            (b"Action=%zz&Version=2016-11-15", "MalformedQueryString"),
            (b"\xff\xfe\x00garbage", "MalformedQueryString"),
            (b"Version=2016-11-15", "MissingAction"),
            (b"Action=DescribeVpcs", "MissingParameter"),
            (b"Action=DescribeVpcs&Version=2012-01-01", "NoSuchVersion"),
            (b"Action=LaunchMissiles&Version=2016-11-15", "InvalidAction"),
            (b"Action=DescribeVpcs&Version=2016-11-15&MaxResults=lots", "InvalidParameterValue"),
            (b"Action=DescribeVpcs&Version=2016-11-15&MaxResults=2", "InvalidParameterValue"),
            (b"Action=DescribeVpcs&Version=2016-11-15&VpcId.x=vpc-1", "InvalidParameterValue"),
            (b"Action=CreateVpc&Version=2016-11-15", "MissingParameter"),
            (b"Action=CreateVpc&Version=2016-11-15&CidrBlock=10.0.0.0/16&DryRun=true", "DryRunOperation"),
            (b"Action=AttachNetworkInterface&Version=2016-11-15&NetworkInterfaceId=eni-1&InstanceId=i-1&DeviceIndex=-5", "InvalidParameterValue"),
            (b"Action=DescribeVpcs&Version=2016-11-15&Action=CreateVpc", "MalformedQueryString"),
            (b"Action=CreateTags&Version=2016-11-15&ResourceId.1=vpc-0123456789abcdef0&Tag.1.Key=%3Cx%3E", "InvalidVpcID.NotFound"),
        ]
        for body, want in cases:
            st, got = self.code(body)
            self.assertEqual((st, got), (400, want), body)
        for chunked in (False, True):
            st, data = self.oversized(chunked)
            self.assertEqual(st, 413, data)
            self.assertIn("<Code>RequestEntityTooLarge</Code>", data)
        st, got = self.code(b"", method="DELETE")
        self.assertEqual(got, "UnsupportedHttpVerb")
        st, data = self.post(None, method="GET", path="/?Action=DescribeVpcs&Version=2016-11-15")
        self.assertEqual(st, 200)
        self.assertIn("<DescribeVpcsResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">", data)
        # Escaping: a description with markup survives the round trip.
        v = self.vpc("10.70.0.0/16")
        s = self.subnet(v, "10.70.0.0/24")
        e = self.ec2.create_network_interface(SubnetId=s, Description="<b>&'\"</b>")["NetworkInterface"]
        self.assertEqual(e["Description"], "<b>&'\"</b>")
        self.assertTrue(self.d.alive())
        self.assertTrue(self.ec2.describe_vpcs(VpcIds=[v])["Vpcs"])


class ConcurrencyTests(Base):
    def test_parallel_creates_and_attaches(self):
        v = self.vpc("10.80.0.0/16")
        s = self.subnet(v, "10.80.0.0/20")
        insts = [self.launch(s, "p4d.24xlarge") for _ in range(2)]
        for i in insts:
            self.wait_state(i, "running")
        made, errors = [], []
        lock = threading.Lock()

        def work(n):
            try:
                c = self.d.client()
                e = c.create_network_interface(SubnetId=s)["NetworkInterface"]
                k = n // 2  # 0..24 per instance: card 0 devices 1..14, then card 1 devices 0..10
                card, dev = (0, 1 + k) if k < 14 else (1, k - 14)
                c.attach_network_interface(NetworkInterfaceId=e["NetworkInterfaceId"], InstanceId=insts[n % 2],
                                           DeviceIndex=dev, NetworkCardIndex=card)
                with lock:
                    made.append(e)
            except Exception as ex:  # collected and asserted below
                with lock:
                    errors.append(repr(ex))

        threads = [threading.Thread(target=work, args=(n,)) for n in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(len(made), 50)
        ips = [e["PrivateIpAddress"] for e in made]
        self.assertEqual(len(set(ips)), 50, "duplicate addresses handed out")
        self.assertEqual(len({e["MacAddress"] for e in made}), 50)
        for i in insts:
            got = self.ec2.describe_network_interfaces(Filters=[{"Name": "attachment.instance-id", "Values": [i]}])["NetworkInterfaces"]
            self.assertEqual(len(got), 26)
            slots = {(x["Attachment"]["NetworkCardIndex"], x["Attachment"]["DeviceIndex"]) for x in got}
            self.assertEqual(len(slots), 26)
        # Collisions refused under contention: everyone wants device 1 on card 1.
        spare = [self.ec2.create_network_interface(SubnetId=s)["NetworkInterface"]["NetworkInterfaceId"] for _ in range(8)]
        results = []

        def collide(e):
            try:
                self.d.client().attach_network_interface(NetworkInterfaceId=e, InstanceId=insts[0], DeviceIndex=14, NetworkCardIndex=3)
                results.append("ok")
            except Exception as ex:
                results.append(getattr(ex, "response", {}).get("Error", {}).get("Code", repr(ex)))

        threads = [threading.Thread(target=collide, args=(e,)) for e in spare]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(results.count("ok"), 1, results)
        self.assertEqual(results.count("InvalidParameterValue"), 7, results)


class NatGatewayTests(Base):
    """CreateNatGateway / DeleteNatGateway / DescribeNatGateways and their
    interface, Elastic IPs and routes."""

    def public_vpc(self, cidr):
        v = self.vpc(cidr)
        s = self.subnet(v, cidr.replace("0.0/16", "1.0/24"))
        igw = self.ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
        self.ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=v)
        return v, s

    def nat(self, nid):
        return self.ec2.describe_nat_gateways(NatGatewayIds=[nid])["NatGateways"][0]

    def test_lifecycle_public(self):
        v, s = self.public_vpc("10.60.0.0/16")
        a = self.ec2.allocate_address(Domain="vpc")
        r = self.ec2.create_nat_gateway(SubnetId=s, AllocationId=a["AllocationId"], ClientToken="nat-tok-1",
                                        TagSpecifications=[{"ResourceType": "natgateway", "Tags": [{"Key": "Name", "Value": "gw"}]}])
        self.assertEqual(r["ClientToken"], "nat-tok-1")
        n = r["NatGateway"]
        nid = n["NatGatewayId"]
        self.assertRegex(nid, r"^nat-[0-9a-f]{17}$")
        self.assertEqual((n["State"], n["SubnetId"], n["VpcId"], n["ConnectivityType"]), ("pending", s, v, "public"))
        self.assertEqual(n["Tags"], [{"Key": "Name", "Value": "gw"}])
        wait_until(lambda: self.nat(nid)["State"] == "available", what="nat available")
        n = self.nat(nid)
        [addr] = n["NatGatewayAddresses"]
        self.assertEqual((addr["AllocationId"], addr["PublicIp"], addr["IsPrimary"], addr["Status"]),
                         (a["AllocationId"], a["PublicIp"], True, "succeeded"))
        # Idempotent: the same token gives the same gateway.
        again = self.ec2.create_nat_gateway(SubnetId=s, AllocationId=a["AllocationId"], ClientToken="nat-tok-1")
        self.assertEqual(again["NatGateway"]["NatGatewayId"], nid)
        self.assertEqual(len(self.ec2.describe_nat_gateways(Filters=[{"Name": "vpc-id", "Values": [v]}])["NatGateways"]), 1)
        # The requester-managed interface.
        e = self.eni(addr["NetworkInterfaceId"])
        self.assertEqual(e["Description"], "Interface for NAT Gateway " + nid)
        self.assertFalse(e["SourceDestCheck"])
        self.assertEqual(e["Groups"], [])
        self.assertEqual(e["PrivateIpAddress"], addr["PrivateIp"])
        self.assertEqual(e["Association"]["PublicIp"], a["PublicIp"])
        eip = self.ec2.describe_addresses(AllocationIds=[a["AllocationId"]])["Addresses"][0]
        self.assertEqual((eip["NetworkInterfaceId"], eip["PrivateIpAddress"]), (e["NetworkInterfaceId"], addr["PrivateIp"]))
        # The address belongs to the gateway.
        self.err("OperationNotPermitted", self.ec2.disassociate_address, AssociationId=eip["AssociationId"])
        self.err("DependencyViolation", self.ec2.delete_subnet, SubnetId=s)
        # Filters.
        for f, val, want in [("nat-gateway-id", nid, 1), ("state", "available", 1), ("state", "pending", 0),
                             ("subnet-id", s, 1), ("tag:Name", "gw", 1), ("tag:Name", "other", 0)]:
            got = self.ec2.describe_nat_gateways(Filters=[{"Name": f, "Values": [val]}, {"Name": "vpc-id", "Values": [v]}])["NatGateways"]
            self.assertEqual(len(got), want, (f, val))
        # A private subnet's default route through it.
        priv = self.subnet(v, "10.60.2.0/24")
        rt = self.ec2.create_route_table(VpcId=v)["RouteTable"]["RouteTableId"]
        self.ec2.associate_route_table(RouteTableId=rt, SubnetId=priv)
        self.ec2.create_route(RouteTableId=rt, DestinationCidrBlock="0.0.0.0/0", NatGatewayId=nid)

        def route():
            rs = self.ec2.describe_route_tables(RouteTableIds=[rt])["RouteTables"][0]["Routes"]
            return [x for x in rs if x["DestinationCidrBlock"] == "0.0.0.0/0"][0]
        self.assertEqual((route()["NatGatewayId"], route()["State"]), (nid, "active"))
        # Delete: deleting, then deleted; interface gone, address kept but free.
        self.assertEqual(self.ec2.delete_nat_gateway(NatGatewayId=nid)["NatGatewayId"], nid)
        wait_until(lambda: self.nat(nid)["State"] == "deleted", what="nat deleted")
        self.assertIn("DeleteTime", self.nat(nid))
        self.err("InvalidNetworkInterfaceID.NotFound", self.ec2.describe_network_interfaces, NetworkInterfaceIds=[e["NetworkInterfaceId"]])
        eip = self.ec2.describe_addresses(AllocationIds=[a["AllocationId"]])["Addresses"][0]
        self.assertNotIn("AssociationId", eip)
        self.assertEqual(route()["State"], "blackhole")
        self.err("InvalidNatGatewayID.NotFound", self.ec2.create_route, RouteTableId=rt, DestinationCidrBlock="1.0.0.0/8", NatGatewayId=nid)
        self.err("NatGatewayNotFound", self.ec2.delete_nat_gateway, NatGatewayId=nid)
        # The address can serve a new gateway.
        n2 = self.ec2.create_nat_gateway(SubnetId=s, AllocationId=a["AllocationId"])["NatGateway"]["NatGatewayId"]
        self.assertNotEqual(n2, nid)
        self.ec2.delete_nat_gateway(NatGatewayId=n2)

    def test_secondary_addresses(self):
        v, s = self.public_vpc("10.61.0.0/16")
        allocs = [self.ec2.allocate_address(Domain="vpc") for _ in range(3)]
        n = self.ec2.create_nat_gateway(SubnetId=s, AllocationId=allocs[0]["AllocationId"],
                                        SecondaryAllocationIds=[allocs[1]["AllocationId"], allocs[2]["AllocationId"]],
                                        SecondaryPrivateIpAddresses=["10.61.1.20", "10.61.1.21"])["NatGateway"]
        addrs = n["NatGatewayAddresses"]
        self.assertEqual([(x["AllocationId"], x["PrivateIp"], x["IsPrimary"]) for x in addrs[1:]],
                         [(allocs[1]["AllocationId"], "10.61.1.20", False), (allocs[2]["AllocationId"], "10.61.1.21", False)])
        e = self.eni(addrs[0]["NetworkInterfaceId"])
        self.assertEqual(len(e["PrivateIpAddresses"]), 3)
        for x in allocs:
            got = self.ec2.describe_addresses(AllocationIds=[x["AllocationId"]])["Addresses"][0]
            self.assertEqual(got["NetworkInterfaceId"], e["NetworkInterfaceId"])
        # A private gateway needs no internet gateway and no Elastic IP.
        v2 = self.vpc("10.62.0.0/16")
        s2 = self.subnet(v2, "10.62.1.0/24")
        p = self.ec2.create_nat_gateway(SubnetId=s2, ConnectivityType="private", SecondaryPrivateIpAddressCount=2,
                                        PrivateIpAddress="10.62.1.10")["NatGateway"]
        self.assertEqual(p["ConnectivityType"], "private")
        self.assertEqual(p["NatGatewayAddresses"][0]["PrivateIp"], "10.62.1.10")
        self.assertEqual(len(p["NatGatewayAddresses"]), 3)
        self.assertTrue(all("PublicIp" not in x for x in p["NatGatewayAddresses"]))

    def test_errors(self):
        v = self.vpc("10.63.0.0/16")
        s = self.subnet(v, "10.63.1.0/24")
        a = self.ec2.allocate_address(Domain="vpc")["AllocationId"]
        self.err("Gateway.NotAttached", self.ec2.create_nat_gateway, SubnetId=s, AllocationId=a)
        igw = self.ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
        self.ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=v)
        self.err("MissingParameter", self.ec2.create_nat_gateway, SubnetId=s)
        self.err("InvalidAllocationID.NotFound", self.ec2.create_nat_gateway, SubnetId=s, AllocationId="eipalloc-0123456789abcdef0")
        self.err("InvalidAllocationID.Malformed", self.ec2.create_nat_gateway, SubnetId=s, AllocationId="bogus")
        self.err("InvalidSubnetID.NotFound", self.ec2.create_nat_gateway, SubnetId="subnet-0123456789abcdef0", AllocationId=a)
        self.err("InvalidParameterCombination", self.ec2.create_nat_gateway, SubnetId=s, AllocationId=a, ConnectivityType="private")
        self.err("InvalidParameterValue", self.ec2.create_nat_gateway, SubnetId=s, AllocationId=a, ConnectivityType="both")
        self.err("InvalidParameterValue", self.ec2.create_nat_gateway, SubnetId=s, AllocationId=a, SecondaryAllocationIds=[a])
        e = self.ec2.create_network_interface(SubnetId=s)["NetworkInterface"]["NetworkInterfaceId"]
        self.ec2.associate_address(AllocationId=a, NetworkInterfaceId=e)
        self.err("Resource.AlreadyAssociated", self.ec2.create_nat_gateway, SubnetId=s, AllocationId=a)
        self.err("NatGatewayNotFound", self.ec2.describe_nat_gateways, NatGatewayIds=["nat-0123456789abcdef0"])
        self.err("NatGatewayMalformed", self.ec2.delete_nat_gateway, NatGatewayId="nat-xyz")
        self.err("InvalidNatGatewayID.NotFound", self.ec2.create_route, RouteTableId=self.main_rtb(v),
                 DestinationCidrBlock="0.0.0.0/0", NatGatewayId="nat-0123456789abcdef0")
        self.err("InvalidParameterValue", self.ec2.describe_nat_gateways, Filters=[{"Name": "bogus", "Values": ["x"]}])
        # A gateway of another VPC cannot be a route target.
        v2 = self.vpc("10.64.0.0/16")
        s2 = self.subnet(v2, "10.64.1.0/24")
        n = self.ec2.create_nat_gateway(SubnetId=s2, ConnectivityType="private")["NatGateway"]["NatGatewayId"]
        self.err("InvalidParameterValue", self.ec2.create_route, RouteTableId=self.main_rtb(v),
                 DestinationCidrBlock="0.0.0.0/0", NatGatewayId=n)
        # Paging over six gateways.
        for i in range(5):
            self.ec2.create_nat_gateway(SubnetId=s2, ConnectivityType="private")
        flt = [{"Name": "vpc-id", "Values": [v2]}]
        p1 = self.ec2.describe_nat_gateways(Filters=flt, MaxResults=5)
        self.assertEqual(len(p1["NatGateways"]), 5)
        p2 = self.ec2.describe_nat_gateways(Filters=flt, MaxResults=5, NextToken=p1["NextToken"])
        self.assertEqual(len(p2["NatGateways"]), 1)
        self.assertNotIn("NextToken", p2)
        ids = [x["NatGatewayId"] for x in p1["NatGateways"] + p2["NatGateways"]]
        self.assertEqual(len(set(ids)), 6)
        self.err("InvalidParameterCombination", self.ec2.describe_nat_gateways, NatGatewayIds=[n], MaxResults=5)

    def test_tags_through_ec2(self):
        v = self.vpc("10.65.0.0/16")
        s = self.subnet(v, "10.65.1.0/24")
        n = self.ec2.create_nat_gateway(SubnetId=s, ConnectivityType="private")["NatGateway"]["NatGatewayId"]
        self.ec2.create_tags(Resources=[n], Tags=[{"Key": "team", "Value": "net"}])
        self.assertEqual(self.ec2.describe_nat_gateways(NatGatewayIds=[n])["NatGateways"][0]["Tags"], [{"Key": "team", "Value": "net"}])
        got = self.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [n]}])["Tags"]
        self.assertEqual([(t["ResourceType"], t["Key"]) for t in got], [("natgateway", "team")])

    def main_rtb(self, v):
        return self.ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [v]}])["RouteTables"][0]["RouteTableId"]


class ElbTests(Base):
    """ELBv2 (2015-12-01) network load balancers on the same endpoint."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.elb = cls.d.client("elbv2")

    def eerr(self, code, fn, *args, **kw):
        with self.assertRaises(ClientError) as cm:
            fn(*args, **kw)
        e = cm.exception.response["Error"]
        self.assertEqual(e["Code"], code, e.get("Message"))
        self.assertEqual(e.get("Type"), "Sender")
        self.assertEqual(cm.exception.response["ResponseMetadata"]["HTTPStatusCode"], 400)
        return e["Message"]

    def net(self, cidr, igw=False):
        v = self.vpc(cidr)
        base = cidr.split(".")
        s1 = self.subnet(v, "%s.%s.1.0/24" % (base[0], base[1]), az="us-east-1a")
        s2 = self.subnet(v, "%s.%s.2.0/24" % (base[0], base[1]), az="us-east-1b")
        if igw:
            g = self.ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
            self.ec2.attach_internet_gateway(InternetGatewayId=g, VpcId=v)
        return v, s1, s2

    def lb(self, arn):
        return self.elb.describe_load_balancers(LoadBalancerArns=[arn])["LoadBalancers"][0]

    def tg(self, name, vpc, **kw):
        args = dict(Name=name, Protocol="TCP", Port=80, VpcId=vpc)
        args.update(kw)
        return self.elb.create_target_group(**args)["TargetGroups"][0]

    def health(self, tg_arn, **kw):
        return [(h["Target"]["Id"], h["Target"]["Port"], h["TargetHealth"]["State"], h["TargetHealth"].get("Reason"))
                for h in self.elb.describe_target_health(TargetGroupArn=tg_arn, **kw)["TargetHealthDescriptions"]]

    def test_load_balancer_lifecycle(self):
        v, s1, s2 = self.net("10.70.0.0/16")
        r = self.elb.create_load_balancer(Name="inner", Type="network", Scheme="internal",
                                          SubnetMappings=[{"SubnetId": s1, "PrivateIPv4Address": "10.70.1.100"}, {"SubnetId": s2}],
                                          Tags=[{"Key": "env", "Value": "lab"}])["LoadBalancers"][0]
        arn = r["LoadBalancerArn"]
        self.assertRegex(arn, r"^arn:aws:elasticloadbalancing:us-east-1:\d{12}:loadbalancer/net/inner/[0-9a-f]{16}$")
        hexid = arn.rsplit("/", 1)[1]
        self.assertEqual(r["DNSName"], "inner-%s.elb.us-east-1.amazonaws.com" % hexid)
        self.assertEqual((r["Type"], r["Scheme"], r["VpcId"], r["State"]["Code"]), ("network", "internal", v, "provisioning"))
        zones = {z["SubnetId"]: z for z in r["AvailabilityZones"]}
        self.assertEqual(zones[s1]["ZoneName"], "us-east-1a")
        self.assertEqual(zones[s1]["LoadBalancerAddresses"][0]["PrivateIPv4Address"], "10.70.1.100")
        wait_until(lambda: self.lb(arn)["State"]["Code"] == "active", what="lb active")
        # One requester-managed interface per subnet; its address is the VIP.
        enis = self.ec2.describe_network_interfaces(Filters=[{"Name": "description", "Values": ["ELB net/inner/" + hexid]}])["NetworkInterfaces"]
        self.assertEqual(sorted(e["SubnetId"] for e in enis), sorted([s1, s2]))
        self.assertIn("10.70.1.100", [e["PrivateIpAddress"] for e in enis])
        self.assertTrue(all(not e["SourceDestCheck"] and e["Groups"] == [] for e in enis))
        # Idempotent create; a different one with the same name is refused.
        again = self.elb.create_load_balancer(Name="inner", Type="network", Scheme="internal", Subnets=[s2, s1])["LoadBalancers"][0]
        self.assertEqual(again["LoadBalancerArn"], arn)
        self.eerr("DuplicateLoadBalancerName", self.elb.create_load_balancer, Name="inner", Type="network", Scheme="internal", Subnets=[s1])
        self.assertEqual([x["LoadBalancerArn"] for x in self.elb.describe_load_balancers(Names=["inner"])["LoadBalancers"]], [arn])
        self.assertEqual(self.elb.describe_tags(ResourceArns=[arn])["TagDescriptions"][0]["Tags"], [{"Key": "env", "Value": "lab"}])
        # ELBv2 tags are not EC2's.
        self.assertEqual(self.ec2.describe_tags(Filters=[{"Name": "key", "Values": ["env"]}])["Tags"], [])
        self.elb.delete_load_balancer(LoadBalancerArn=arn)
        self.eerr("LoadBalancerNotFound", self.elb.describe_load_balancers, LoadBalancerArns=[arn])
        self.assertEqual(self.ec2.describe_network_interfaces(Filters=[{"Name": "description", "Values": ["ELB net/inner/" + hexid]}])["NetworkInterfaces"], [])
        self.elb.delete_load_balancer(LoadBalancerArn=arn)  # gone already: still succeeds, as in AWS
        self.ec2.delete_subnet(SubnetId=s1)

    def test_internet_facing(self):
        v, s1, s2 = self.net("10.71.0.0/16")
        self.eerr("InvalidSubnet", self.elb.create_load_balancer, Name="pub0", Type="network", Subnets=[s1])
        g = self.ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
        self.ec2.attach_internet_gateway(InternetGatewayId=g, VpcId=v)
        a = self.ec2.allocate_address(Domain="vpc")
        r = self.elb.create_load_balancer(Name="pub", Type="network",
                                          SubnetMappings=[{"SubnetId": s1, "AllocationId": a["AllocationId"]}, {"SubnetId": s2}])["LoadBalancers"][0]
        self.assertEqual(r["Scheme"], "internet-facing")
        zones = {z["SubnetId"]: z["LoadBalancerAddresses"][0] for z in r["AvailabilityZones"]}
        self.assertEqual((zones[s1]["IpAddress"], zones[s1]["AllocationId"]), (a["PublicIp"], a["AllocationId"]))
        self.assertRegex(zones[s2]["IpAddress"], r"^203\.0\.113\.\d+$")
        eip = self.ec2.describe_addresses(AllocationIds=[a["AllocationId"]])["Addresses"][0]
        self.assertIn("NetworkInterfaceId", eip)
        self.eerr("ResourceInUse", self.elb.create_load_balancer, Name="pub2", Type="network",
                  SubnetMappings=[{"SubnetId": s1, "AllocationId": a["AllocationId"]}])
        self.eerr("AllocationIdNotFound", self.elb.create_load_balancer, Name="pub3", Type="network",
                  SubnetMappings=[{"SubnetId": s1, "AllocationId": "eipalloc-0123456789abcdef0"}])
        self.eerr("InvalidConfigurationRequest", self.elb.create_load_balancer, Name="pub4", Type="network", Scheme="internal",
                  SubnetMappings=[{"SubnetId": s1, "AllocationId": a["AllocationId"]}])
        self.elb.delete_load_balancer(LoadBalancerArn=r["LoadBalancerArn"])
        eip = self.ec2.describe_addresses(AllocationIds=[a["AllocationId"]])["Addresses"][0]
        self.assertNotIn("NetworkInterfaceId", eip)

    def test_load_balancer_errors(self):
        v, s1, s2 = self.net("10.72.0.0/16")
        s1b = self.subnet(v, "10.72.3.0/24", az="us-east-1a")
        msg = self.eerr("InvalidConfigurationRequest", self.elb.create_load_balancer, Name="alb", Subnets=[s1], Scheme="internal")
        self.assertIn("network", msg)
        self.eerr("InvalidConfigurationRequest", self.elb.create_load_balancer, Name="gw", Type="gateway", Subnets=[s1])
        self.eerr("ValidationError", self.elb.create_load_balancer, Name="nosub", Type="network", Scheme="internal")
        self.eerr("ValidationError", self.elb.create_load_balancer, Name="-bad", Type="network", Scheme="internal", Subnets=[s1])
        self.eerr("ValidationError", self.elb.create_load_balancer, Name="x" * 33, Type="network", Scheme="internal", Subnets=[s1])
        self.eerr("SubnetNotFound", self.elb.create_load_balancer, Name="ghost", Type="network", Scheme="internal", Subnets=["subnet-0123456789abcdef0"])
        self.eerr("InvalidConfigurationRequest", self.elb.create_load_balancer, Name="twoaz", Type="network", Scheme="internal", Subnets=[s1, s1b])
        self.eerr("InvalidConfigurationRequest", self.elb.create_load_balancer, Name="ipout", Type="network", Scheme="internal",
                  SubnetMappings=[{"SubnetId": s1, "PrivateIPv4Address": "10.72.2.9"}])
        self.eerr("ValidationError", self.elb.describe_load_balancers, LoadBalancerArns=["not-an-arn"])
        self.eerr("LoadBalancerNotFound", self.elb.describe_load_balancers,
                  LoadBalancerArns=["arn:aws:elasticloadbalancing:us-east-1:123456789012:loadbalancer/net/x/0123456789abcdef"])
        # Paging with PageSize / Marker.
        arns = [self.elb.create_load_balancer(Name="pg%d" % i, Type="network", Scheme="internal", Subnets=[s2])["LoadBalancers"][0]["LoadBalancerArn"] for i in range(3)]
        seen, marker = [], None
        for _ in range(10):
            kw = {"PageSize": 2}
            if marker:
                kw["Marker"] = marker
            page = self.elb.describe_load_balancers(**kw)
            self.assertLessEqual(len(page["LoadBalancers"]), 2)
            seen += [x["LoadBalancerArn"] for x in page["LoadBalancers"]]
            marker = page.get("NextMarker")
            if not marker:
                break
        self.assertTrue(set(arns) <= set(seen))
        self.assertEqual(len(seen), len(set(seen)))
        for a in arns:
            self.elb.delete_load_balancer(LoadBalancerArn=a)

    def test_target_groups_and_attributes(self):
        v, s1, s2 = self.net("10.73.0.0/16")
        g = self.tg("web", v, Tags=[{"Key": "k", "Value": "v"}])
        arn = g["TargetGroupArn"]
        self.assertRegex(arn, r"^arn:aws:elasticloadbalancing:us-east-1:\d{12}:targetgroup/web/[0-9a-f]{16}$")
        self.assertEqual((g["Protocol"], g["Port"], g["TargetType"], g["HealthCheckProtocol"], g["HealthCheckPort"],
                          g["HealthCheckIntervalSeconds"], g["HealthCheckTimeoutSeconds"], g["HealthyThresholdCount"],
                          g["UnhealthyThresholdCount"], g["HealthCheckEnabled"], g["LoadBalancerArns"]),
                         ("TCP", 80, "instance", "TCP", "traffic-port", 30, 10, 5, 2, True, []))
        self.assertEqual(self.tg("web", v)["TargetGroupArn"], arn)  # idempotent
        self.eerr("DuplicateTargetGroupName", self.tg, "web", v, Port=81)
        self.eerr("UnsupportedProtocol", self.tg, "http", v, Protocol="HTTP")
        self.eerr("ValidationError", self.tg, "novpc", "vpc-0123456789abcdef0")
        self.eerr("InvalidConfigurationRequest", self.tg, "lam", v, TargetType="lambda")
        self.eerr("InvalidConfigurationRequest", self.tg, "slow", v, HealthCheckIntervalSeconds=10, HealthCheckTimeoutSeconds=10)
        m = self.elb.modify_target_group(TargetGroupArn=arn, HealthCheckProtocol="HTTP", HealthCheckPath="/ok",
                                         HealthCheckIntervalSeconds=10, HealthCheckTimeoutSeconds=5,
                                         HealthyThresholdCount=3, UnhealthyThresholdCount=3, HealthCheckPort="8080")["TargetGroups"][0]
        self.assertEqual((m["HealthCheckProtocol"], m["HealthCheckPath"], m["HealthCheckIntervalSeconds"], m["HealthCheckTimeoutSeconds"],
                          m["HealthyThresholdCount"], m["UnhealthyThresholdCount"], m["HealthCheckPort"]),
                         ("HTTP", "/ok", 10, 5, 3, 3, "8080"))
        attrs = {a["Key"]: a["Value"] for a in self.elb.describe_target_group_attributes(TargetGroupArn=arn)["Attributes"]}
        self.assertEqual((attrs["deregistration_delay.timeout_seconds"], attrs["stickiness.enabled"], attrs["stickiness.type"],
                          attrs["preserve_client_ip.enabled"]), ("300", "false", "source_ip", "true"))
        out = self.elb.modify_target_group_attributes(TargetGroupArn=arn, Attributes=[
            {"Key": "deregistration_delay.timeout_seconds", "Value": "5"}, {"Key": "stickiness.enabled", "Value": "true"}])["Attributes"]
        out = {a["Key"]: a["Value"] for a in out}
        self.assertEqual((out["deregistration_delay.timeout_seconds"], out["stickiness.enabled"]), ("5", "true"))
        self.eerr("ValidationError", self.elb.modify_target_group_attributes, TargetGroupArn=arn, Attributes=[{"Key": "nope", "Value": "1"}])
        self.eerr("ValidationError", self.elb.modify_target_group_attributes, TargetGroupArn=arn,
                  Attributes=[{"Key": "deregistration_delay.timeout_seconds", "Value": "3601"}])
        self.eerr("ValidationError", self.elb.modify_target_group_attributes, TargetGroupArn=arn,
                  Attributes=[{"Key": "stickiness.type", "Value": "lb_cookie"}])
        self.assertEqual([x["TargetGroupArn"] for x in self.elb.describe_target_groups(Names=["web"])["TargetGroups"]], [arn])
        self.eerr("TargetGroupNotFound", self.elb.describe_target_groups, Names=["ghost"])
        self.eerr("TargetGroupNotFound", self.elb.describe_target_group_attributes,
                  TargetGroupArn="arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/x/0123456789abcdef")
        self.elb.delete_target_group(TargetGroupArn=arn)
        self.eerr("TargetGroupNotFound", self.elb.describe_target_groups, TargetGroupArns=[arn])

    def test_targets_listeners_and_health(self):
        v, s1, s2 = self.net("10.74.0.0/16")
        i1 = self.launch(s1)
        i2 = self.launch(s2)
        self.wait_state(i1, "running")
        self.wait_state(i2, "running")
        lb = self.elb.create_load_balancer(Name="app", Type="network", Scheme="internal", Subnets=[s1, s2])["LoadBalancers"][0]["LoadBalancerArn"]
        g = self.tg("app", v)["TargetGroupArn"]
        self.elb.register_targets(TargetGroupArn=g, Targets=[{"Id": i1}, {"Id": i2, "Port": 8080}])
        self.assertEqual(sorted(self.health(g)), sorted([(i1, 80, "unused", "Target.NotInUse"), (i2, 8080, "unused", "Target.NotInUse")]))
        # Listeners.
        fwd = [{"Type": "forward", "TargetGroupArn": g}]
        ln = self.elb.create_listener(LoadBalancerArn=lb, Protocol="TCP", Port=80, DefaultActions=fwd)["Listeners"][0]
        self.assertRegex(ln["ListenerArn"], r"^arn:aws:elasticloadbalancing:us-east-1:\d{12}:listener/net/app/[0-9a-f]{16}/[0-9a-f]{16}$")
        self.assertEqual(ln["DefaultActions"][0]["TargetGroupArn"], g)
        self.assertEqual(self.elb.create_listener(LoadBalancerArn=lb, Protocol="TCP", Port=80, DefaultActions=fwd)["Listeners"][0]["ListenerArn"],
                         ln["ListenerArn"])
        g2 = self.tg("other", v)["TargetGroupArn"]
        self.eerr("DuplicateListener", self.elb.create_listener, LoadBalancerArn=lb, Protocol="TCP", Port=80,
                  DefaultActions=[{"Type": "forward", "TargetGroupArn": g2}])
        udp = self.tg("udp", v, Protocol="UDP", Port=53)["TargetGroupArn"]
        self.eerr("IncompatibleProtocols", self.elb.create_listener, LoadBalancerArn=lb, Protocol="TCP", Port=53,
                  DefaultActions=[{"Type": "forward", "TargetGroupArn": udp}])
        self.elb.create_listener(LoadBalancerArn=lb, Protocol="UDP", Port=53,
                                 DefaultActions=[{"Type": "forward", "ForwardConfig": {"TargetGroups": [{"TargetGroupArn": udp}]}}])
        self.eerr("UnsupportedProtocol", self.elb.create_listener, LoadBalancerArn=lb, Protocol="HTTP", Port=81, DefaultActions=fwd)
        self.eerr("TargetGroupNotFound", self.elb.create_listener, LoadBalancerArn=lb, Protocol="TCP", Port=82,
                  DefaultActions=[{"Type": "forward", "TargetGroupArn": g.replace("targetgroup/app/", "targetgroup/app/0")[:-1]}])
        self.eerr("InvalidLoadBalancerAction", self.elb.create_listener, LoadBalancerArn=lb, Protocol="TCP", Port=83,
                  DefaultActions=[{"Type": "fixed-response", "FixedResponseConfig": {"StatusCode": "200"}}])
        lb2 = self.elb.create_load_balancer(Name="app2", Type="network", Scheme="internal", Subnets=[s1])["LoadBalancers"][0]["LoadBalancerArn"]
        self.eerr("TargetGroupAssociationLimit", self.elb.create_listener, LoadBalancerArn=lb2, Protocol="TCP", Port=80, DefaultActions=fwd)
        self.assertEqual(len(self.elb.describe_listeners(LoadBalancerArn=lb)["Listeners"]), 2)
        self.assertEqual(self.elb.describe_listeners(ListenerArns=[ln["ListenerArn"]])["Listeners"][0]["Port"], 80)
        self.eerr("ValidationError", self.elb.describe_listeners)
        self.assertEqual(self.elb.describe_target_groups(TargetGroupArns=[g])["TargetGroups"][0]["LoadBalancerArns"], [lb])
        self.assertEqual(sorted(x["TargetGroupArn"] for x in self.elb.describe_target_groups(LoadBalancerArn=lb)["TargetGroups"]), sorted([g, udp]))
        self.eerr("ResourceInUse", self.elb.delete_target_group, TargetGroupArn=g)
        # With a listener and the recording driver (no health checks): initial.
        self.assertEqual(sorted(self.health(g)), sorted([(i1, 80, "initial", "Elb.RegistrationInProgress"),
                                                         (i2, 8080, "initial", "Elb.RegistrationInProgress")]))
        self.assertEqual(self.health(g, Targets=[{"Id": i1}]), [(i1, 80, "initial", "Elb.RegistrationInProgress")])
        i3 = self.launch(s1)
        self.assertEqual(self.health(g, Targets=[{"Id": i3}]), [(i3, 80, "unused", "Target.NotRegistered")])
        # Bad targets.
        self.eerr("InvalidTarget", self.elb.register_targets, TargetGroupArn=g, Targets=[{"Id": "i-0123456789abcdef0"}])
        self.eerr("InvalidTarget", self.elb.register_targets, TargetGroupArn=g, Targets=[{"Id": "10.74.1.9"}])
        other_v = self.vpc("10.75.0.0/16")
        other_i = self.launch(self.subnet(other_v, "10.75.1.0/24"))
        self.eerr("InvalidTarget", self.elb.register_targets, TargetGroupArn=g, Targets=[{"Id": other_i}])
        ipg = self.tg("ips", v, TargetType="ip")["TargetGroupArn"]
        self.elb.register_targets(TargetGroupArn=ipg, Targets=[{"Id": "10.74.1.50"}, {"Id": "192.168.7.7", "Port": 9000}])
        self.eerr("InvalidTarget", self.elb.register_targets, TargetGroupArn=ipg, Targets=[{"Id": "8.8.8.8"}])
        self.eerr("InvalidTarget", self.elb.register_targets, TargetGroupArn=ipg, Targets=[{"Id": i1}])
        self.eerr("InvalidTarget", self.elb.deregister_targets, TargetGroupArn=g, Targets=[{"Id": i3}])
        self.eerr("ValidationError", self.elb.register_targets, TargetGroupArn=g, Targets=[{"Id": i1, "Port": 70000}])
        # A stopped instance is not in use.
        self.ec2.stop_instances(InstanceIds=[i2])
        self.wait_state(i2, "stopped")
        self.assertIn((i2, 8080, "unused", "Target.InvalidState"), self.health(g))
        # Deregistration: draining for the delay, then gone (a job).
        self.elb.modify_target_group_attributes(TargetGroupArn=g, Attributes=[{"Key": "deregistration_delay.timeout_seconds", "Value": "1"}])
        self.elb.deregister_targets(TargetGroupArn=g, Targets=[{"Id": i1}])
        self.assertIn((i1, 80, "draining", "Target.DeregistrationInProgress"), self.health(g))
        wait_until(lambda: i1 not in [h[0] for h in self.health(g)], what="target drained")
        # Registering a draining target again takes it back.
        self.elb.modify_target_group_attributes(TargetGroupArn=g, Attributes=[{"Key": "deregistration_delay.timeout_seconds", "Value": "2"}])
        self.elb.register_targets(TargetGroupArn=g, Targets=[{"Id": i1}])
        self.elb.deregister_targets(TargetGroupArn=g, Targets=[{"Id": i1}])
        self.elb.register_targets(TargetGroupArn=g, Targets=[{"Id": i1}])
        import time
        time.sleep(2.5)
        self.assertIn((i1, 80, "initial", "Elb.RegistrationInProgress"), self.health(g))
        # A terminated instance leaves its target groups.
        self.ec2.terminate_instances(InstanceIds=[i2])
        self.wait_state(i2, "terminated")
        self.assertNotIn(i2, [h[0] for h in self.health(g)])
        # Deleting listeners and the load balancer.
        self.elb.delete_listener(ListenerArn=ln["ListenerArn"])
        self.eerr("ListenerNotFound", self.elb.describe_listeners, ListenerArns=[ln["ListenerArn"]])
        self.eerr("ListenerNotFound", self.elb.delete_listener, ListenerArn=ln["ListenerArn"])
        self.elb.delete_load_balancer(LoadBalancerArn=lb)
        self.assertEqual(self.elb.describe_target_groups(TargetGroupArns=[udp])["TargetGroups"][0]["LoadBalancerArns"], [])
        self.elb.delete_target_group(TargetGroupArn=g)
        self.elb.delete_load_balancer(LoadBalancerArn=lb2)

    def test_tags(self):
        v, s1, s2 = self.net("10.76.0.0/16")
        g = self.tg("tagged", v)["TargetGroupArn"]
        self.elb.add_tags(ResourceArns=[g], Tags=[{"Key": "a", "Value": "1"}, {"Key": "b", "Value": "2"}])
        self.elb.remove_tags(ResourceArns=[g], TagKeys=["a"])
        self.assertEqual(self.elb.describe_tags(ResourceArns=[g])["TagDescriptions"][0]["Tags"], [{"Key": "b", "Value": "2"}])
        self.eerr("TargetGroupNotFound", self.elb.add_tags, ResourceArns=[g[:-1] + "0" if g[-1] != "0" else g[:-1] + "1"],
                  Tags=[{"Key": "a", "Value": "1"}])

    def test_raw_protocol(self):
        """ELBv2's XML shapes, checked on the wire."""
        u = urllib.parse.urlparse(self.d.endpoint)

        def post(body):
            c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
            c.request("POST", "/", body=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
            r = c.getresponse()
            data = r.read().decode()
            c.close()
            return r.status, data
        st, body = post("Action=DescribeLoadBalancers&Version=2015-12-01")
        self.assertEqual(st, 200)
        self.assertIn('<DescribeLoadBalancersResponse xmlns="http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/">', body)
        self.assertIn("<DescribeLoadBalancersResult><LoadBalancers>", body)
        self.assertRegex(body, r"<ResponseMetadata><RequestId>[0-9a-f-]{36}</RequestId></ResponseMetadata>")
        st, body = post("Action=Frobnicate&Version=2015-12-01")
        self.assertEqual(st, 400)
        self.assertIn("<ErrorResponse", body)
        self.assertIn("<Type>Sender</Type><Code>InvalidAction</Code>", body)
        st, body = post("Action=CreateTargetGroup&Version=2015-12-01&Name=x&Protocol=TCP&Port=80&VpcId=vpc-1&Tags.member.x.Key=k")
        self.assertEqual(st, 400)
        self.assertIn("<Code>ValidationError</Code>", body)
        # Ranges botocore would check before sending.
        vpc = self.vpc("10.77.0.0/16")
        st, body = post("Action=CreateTargetGroup&Version=2015-12-01&Name=fast&Protocol=TCP&Port=80&VpcId=%s&HealthCheckIntervalSeconds=1" % vpc)
        self.assertEqual(st, 400)
        self.assertIn("<Code>ValidationError</Code>", body)
        st, body = post("Action=DescribeTargetHealth&Version=2015-12-01&TargetGroupArn=%ff")
        self.assertEqual(st, 400)
        self.assertIn("MalformedQueryString", body)


class ElbRestartTests(unittest.TestCase):
    def test_nat_and_nlb_survive_a_kill(self):
        d = Daemon()
        try:
            ec2, elb = d.client(), d.client("elbv2")
            v = ec2.create_vpc(CidrBlock="10.91.0.0/16")["Vpc"]["VpcId"]
            s = ec2.create_subnet(VpcId=v, CidrBlock="10.91.1.0/24")["Subnet"]["SubnetId"]
            n = ec2.create_nat_gateway(SubnetId=s, ConnectivityType="private")["NatGateway"]["NatGatewayId"]
            lb = elb.create_load_balancer(Name="keep", Type="network", Scheme="internal", Subnets=[s])["LoadBalancers"][0]["LoadBalancerArn"]
            g = elb.create_target_group(Name="keep", Protocol="TCP_UDP", Port=53, VpcId=v, TargetType="ip")["TargetGroups"][0]["TargetGroupArn"]
            elb.create_listener(LoadBalancerArn=lb, Protocol="TCP_UDP", Port=53, DefaultActions=[{"Type": "forward", "TargetGroupArn": g}])
            elb.register_targets(TargetGroupArn=g, Targets=[{"Id": "10.91.1.40"}, {"Id": "10.91.1.41"}])
            elb.modify_target_group_attributes(TargetGroupArn=g, Attributes=[{"Key": "deregistration_delay.timeout_seconds", "Value": "3"}])
            elb.deregister_targets(TargetGroupArn=g, Targets=[{"Id": "10.91.1.41"}])
            wait_until(lambda: ec2.describe_nat_gateways(NatGatewayIds=[n])["NatGateways"][0]["State"] == "available")

            def snap():
                return (ec2.describe_nat_gateways()["NatGateways"], elb.describe_load_balancers()["LoadBalancers"],
                        elb.describe_target_groups()["TargetGroups"], elb.describe_listeners(LoadBalancerArn=lb)["Listeners"],
                        elb.describe_target_group_attributes(TargetGroupArn=g)["Attributes"])
            before = snap()
            d.restart()
            ec2, elb = d.client(), d.client("elbv2")
            self.assertEqual(before, snap())
            health = {h["Target"]["Id"]: h["TargetHealth"]["State"] for h in elb.describe_target_health(TargetGroupArn=g)["TargetHealthDescriptions"]}
            self.assertEqual(health.get("10.91.1.41"), "draining")
            # The drain timer is re-armed after the restart.
            wait_until(lambda: [h["Target"]["Id"] for h in elb.describe_target_health(TargetGroupArn=g)["TargetHealthDescriptions"]] == ["10.91.1.40"],
                       timeout=15, what="drain after restart")
            # A deletion in flight at the kill is finished after the restart.
            ec2.delete_nat_gateway(NatGatewayId=n)
            d.restart()
            ec2 = d.client()
            wait_until(lambda: ec2.describe_nat_gateways(NatGatewayIds=[n])["NatGateways"][0]["State"] == "deleted")
        finally:
            d.close()


class RestartTests(unittest.TestCase):
    def test_everything_survives_a_kill(self):
        d = Daemon()
        try:
            ec2 = d.client()
            v = ec2.create_vpc(CidrBlock="10.90.0.0/16", TagSpecifications=[{"ResourceType": "vpc", "Tags": [{"Key": "k", "Value": "v"}]}])["Vpc"]["VpcId"]
            s = ec2.create_subnet(VpcId=v, CidrBlock="10.90.1.0/24")["Subnet"]["SubnetId"]
            g = ec2.create_security_group(GroupName="keep", Description="d", VpcId=v)["GroupId"]
            ec2.authorize_security_group_ingress(GroupId=g, IpPermissions=[{"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
            igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
            ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=v)
            i = ec2.run_instances(ImageId=IMAGE, InstanceType="m5.large", MinCount=1, MaxCount=1, SubnetId=s)["Instances"][0]["InstanceId"]
            wait_until(lambda: ec2.describe_instances(InstanceIds=[i])["Reservations"][0]["Instances"][0]["State"]["Name"] == "running")
            e = ec2.create_network_interface(SubnetId=s, Groups=[g])["NetworkInterface"]["NetworkInterfaceId"]
            att = ec2.attach_network_interface(NetworkInterfaceId=e, InstanceId=i, DeviceIndex=1)["AttachmentId"]
            a = ec2.allocate_address(Domain="vpc")["AllocationId"]
            ec2.associate_address(AllocationId=a, NetworkInterfaceId=e)
            fl = ec2.create_flow_logs(ResourceIds=[e], ResourceType="NetworkInterface", TrafficType="ALL", LogDestination="/tmp/fl.log")["FlowLogIds"][0]
            before = {
                "vpcs": ec2.describe_vpcs()["Vpcs"],
                "subnets": ec2.describe_subnets()["Subnets"],
                "sgs": ec2.describe_security_groups()["SecurityGroups"],
                "enis": ec2.describe_network_interfaces()["NetworkInterfaces"],
                "addrs": ec2.describe_addresses()["Addresses"],
                "rtbs": ec2.describe_route_tables()["RouteTables"],
                "acls": ec2.describe_network_acls()["NetworkAcls"],
                "igws": ec2.describe_internet_gateways()["InternetGateways"],
                "fls": ec2.describe_flow_logs()["FlowLogs"],
            }
            d.restart()  # SIGKILL, then start on the same state directory
            ec2 = d.client()
            after = {
                "vpcs": ec2.describe_vpcs()["Vpcs"],
                "subnets": ec2.describe_subnets()["Subnets"],
                "sgs": ec2.describe_security_groups()["SecurityGroups"],
                "enis": ec2.describe_network_interfaces()["NetworkInterfaces"],
                "addrs": ec2.describe_addresses()["Addresses"],
                "rtbs": ec2.describe_route_tables()["RouteTables"],
                "acls": ec2.describe_network_acls()["NetworkAcls"],
                "igws": ec2.describe_internet_gateways()["InternetGateways"],
                "fls": ec2.describe_flow_logs()["FlowLogs"],
            }
            for k in before:
                self.assertEqual(before[k], after[k], k)
            self.assertEqual(ec2.describe_instances(InstanceIds=[i])["Reservations"][0]["Instances"][0]["State"]["Name"], "running")
            self.assertEqual(ec2.describe_network_interfaces(NetworkInterfaceIds=[e])["NetworkInterfaces"][0]["Attachment"]["AttachmentId"], att)
            self.assertEqual(ec2.describe_flow_logs(FlowLogIds=[fl])["FlowLogs"][0]["ResourceId"], e)
            # Still writable, and new IDs do not collide with the old ones.
            e2 = ec2.create_network_interface(SubnetId=s)["NetworkInterface"]
            self.assertNotIn(e2["PrivateIpAddress"], [x["PrivateIpAddress"] for x in before["enis"]])
            # A transition in flight at the kill is finished after the restart.
            ec2.stop_instances(InstanceIds=[i])
            d.restart()
            ec2 = d.client()
            wait_until(lambda: ec2.describe_instances(InstanceIds=[i])["Reservations"][0]["Instances"][0]["State"]["Name"] == "stopped")
        finally:
            d.close()


class CliTests(unittest.TestCase):
    """A few `aws --endpoint-url ... ec2 ...` invocations."""

    def test_aws_cli(self):
        aws = shutil.which("aws", path=os.path.dirname(sys.executable)) or shutil.which("aws")
        if not aws:
            if os.environ.get("ENILAB_REQUIRE_API") == "1":
                self.fail("the aws CLI is not installed")
            self.skipTest("the aws CLI is not installed")
        d = Daemon()
        try:
            env = dict(os.environ, AWS_ACCESS_KEY_ID="enilab", AWS_SECRET_ACCESS_KEY="enilab", AWS_DEFAULT_REGION="us-east-1",
                       AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")

            def aws_ec2(*args, check=True):
                p = subprocess.run([aws, "--endpoint-url", d.endpoint, "--output", "json", "ec2"] + list(args),
                                   env=env, capture_output=True, text=True, timeout=60)
                if check and p.returncode != 0:
                    raise AssertionError("aws %s failed: %s" % (" ".join(args), p.stderr))
                return p

            import json
            vpc = json.loads(aws_ec2("create-vpc", "--cidr-block", "10.99.0.0/16").stdout)["Vpc"]["VpcId"]
            sub = json.loads(aws_ec2("create-subnet", "--vpc-id", vpc, "--cidr-block", "10.99.1.0/24").stdout)["Subnet"]["SubnetId"]
            eni = json.loads(aws_ec2("create-network-interface", "--subnet-id", sub, "--description", "cli").stdout)["NetworkInterface"]
            self.assertEqual(eni["PrivateIpAddress"], "10.99.1.4")
            out = json.loads(aws_ec2("describe-network-interfaces", "--filters", "Name=subnet-id,Values=" + sub).stdout)
            self.assertEqual([x["NetworkInterfaceId"] for x in out["NetworkInterfaces"]], [eni["NetworkInterfaceId"]])
            g = json.loads(aws_ec2("describe-security-groups", "--filters", "Name=vpc-id,Values=" + vpc).stdout)["SecurityGroups"][0]["GroupId"]
            aws_ec2("authorize-security-group-ingress", "--group-id", g, "--protocol", "tcp", "--port", "22", "--cidr", "10.0.0.0/8")
            p = aws_ec2("authorize-security-group-ingress", "--group-id", g, "--protocol", "tcp", "--port", "22", "--cidr", "10.0.0.0/8", check=False)
            self.assertNotEqual(p.returncode, 0)
            self.assertIn("InvalidPermission.Duplicate", p.stderr)
            p = aws_ec2("describe-vpcs", "--vpc-ids", "vpc-0123456789abcdef0", check=False)
            self.assertIn("InvalidVpcID.NotFound", p.stderr)
            imgs = json.loads(aws_ec2("describe-images", "--owners", "self").stdout)["Images"]
            self.assertEqual(imgs[0]["ImageId"], IMAGE)
            nat = json.loads(aws_ec2("create-nat-gateway", "--subnet-id", sub, "--connectivity-type", "private").stdout)["NatGateway"]
            out = json.loads(aws_ec2("describe-nat-gateways", "--filter", "Name=subnet-id,Values=" + sub).stdout)
            self.assertEqual([x["NatGatewayId"] for x in out["NatGateways"]], [nat["NatGatewayId"]])

            def aws_elb(*args, check=True):
                p = subprocess.run([aws, "--endpoint-url", d.endpoint, "--output", "json", "elbv2"] + list(args),
                                   env=env, capture_output=True, text=True, timeout=60)
                if check and p.returncode != 0:
                    raise AssertionError("aws elbv2 %s failed: %s" % (" ".join(args), p.stderr))
                return p
            tg = json.loads(aws_elb("create-target-group", "--name", "cli", "--protocol", "TCP", "--port", "80",
                                    "--vpc-id", vpc, "--target-type", "ip").stdout)["TargetGroups"][0]
            aws_elb("register-targets", "--target-group-arn", tg["TargetGroupArn"], "--targets", "Id=10.99.1.77,Port=8080")
            h = json.loads(aws_elb("describe-target-health", "--target-group-arn", tg["TargetGroupArn"]).stdout)["TargetHealthDescriptions"]
            self.assertEqual([(x["Target"]["Id"], x["Target"]["Port"], x["TargetHealth"]["State"]) for x in h], [("10.99.1.77", 8080, "unused")])
            p = aws_elb("create-load-balancer", "--name", "cli", "--type", "application", "--subnets", sub, check=False)
            self.assertNotEqual(p.returncode, 0)
            self.assertIn("InvalidConfigurationRequest", p.stderr)
        finally:
            d.close()


if __name__ == "__main__":
    unittest.main(verbosity=2)
