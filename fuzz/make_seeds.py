"""Write the committed seeds in corpus/<target>/seed-*: a few well-formed
inputs per target, so the fuzzer starts from paths that go deep."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    with open(os.path.join(HERE, "corpus", target, "seed-" + name), "wb") as f:
        f.write(data)


# --- vhost_user: records [tag][len][chunk]; tag 1 = memfd, 2 = eventfd, bits 2-3 = queue pairs - 1
def msg(req, payload=b"", flags=1):
    return struct.pack("<III", req, flags, len(payload)) + payload


def rec(m, tag=0):
    assert len(m) < 256
    return bytes([tag, len(m)]) + m


UA = 0x7F00_0000_0000
feat = (1 << 32) | (1 << 30) | (1 << 15) | (1 << 28)  # VERSION_1, PROTOCOL_FEATURES, MRG_RXBUF, INDIRECT
s = rec(msg(1)) + rec(msg(3)) + rec(msg(15)) + rec(msg(16, struct.pack("<Q", 0x3)))
s += rec(msg(2, struct.pack("<Q", feat)))
s += rec(msg(5, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 0x10000, UA, 0)), tag=1)
for i, base in ((0, 0x0), (1, 0x3000)):
    s += rec(msg(8, struct.pack("<II", i, 16)))
    s += rec(msg(9, struct.pack("<IIQQQQ", i, 0, UA + base, UA + base + 0x2000, UA + base + 0x1000, 0)))
    s += rec(msg(10, struct.pack("<II", i, 0)))
    s += rec(msg(12, struct.pack("<Q", i)), tag=2)
    s += rec(msg(18, struct.pack("<II", i, 1)))
s += rec(msg(24, struct.pack("<III", 0, 12, 0) + bytes(12)))
put("vhost_user", "handshake", s)
put("vhost_user", "get-vring-base", s + rec(msg(11, struct.pack("<II", 1, 0))) + rec(msg(4)))


# --- virtqueue: [features][log2 qsize][extra len][extra][memory image]
def frame(dst, src, payload_ip):
    return bytes(dst) + bytes(src) + b"\x08\x00" + payload_ip


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def ipv4(src, dst, proto, l4, ttl=64):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, ttl, proto, 0, bytes(src), bytes(dst))
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + l4


def tcp(sport, dport, flags=0x02):
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


def udp(sport, dport, data=b"hello"):
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def vq_image(feat, frames_tx, rx_bufs=4):
    img = bytearray(0x10000)
    # TX ring at 0x3000/0x4000/0x5000; buffers from 0x6000.
    at = 0x6000
    for i, f in enumerate(frames_tx):
        buf = bytes(12) + f
        img[at:at + len(buf)] = buf
        struct.pack_into("<QIHH", img, 0x3000 + 16 * i, at, len(buf), 0, 0)
        struct.pack_into("<H", img, 0x4000 + 4 + 2 * i, i)
        at += 0x800
    struct.pack_into("<H", img, 0x4002, len(frames_tx))
    # RX ring at 0x0/0x1000/0x2000: writable buffers.
    for i in range(rx_bufs):
        struct.pack_into("<QIHH", img, 16 * i, 0xA000 + 0x800 * i, 0x800, 2, 0)
        struct.pack_into("<H", img, 0x1000 + 4 + 2 * i, i)
    struct.pack_into("<H", img, 0x1002, rx_bufs)
    # Memory past the image is zero: cut the trailing zeros.
    return bytes([feat, 4, 0]) + bytes(img).rstrip(b"\0")


M1, M2 = [2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]
f1 = frame(M2, M1, ipv4([10, 0, 1, 10], [10, 0, 1, 20], 6, tcp(40000, 5432)))
f2 = frame(M2, M1, ipv4([10, 0, 1, 10], [10, 0, 1, 20], 17, udp(5353, 53, b"x" * 600)))
put("virtqueue", "two-frames", vq_image(0x00, [f1, f2]))
put("virtqueue", "mrg-indirect-csum", vq_image(0x0F, [f1]))

# --- pipeline: records [sel][len][frame]; sel low nibble = ingress index (1..7 ports, 8 uplink, 9 natgw, 10 nlb)
GW = [2, 0, 0, 0, 0, 0xFE]  # any: the switch answers for the gateway
BC = [0xFF] * 6
arp = bytes(BC) + bytes(M1) + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + bytes(M1) + bytes([10, 0, 1, 10]) + bytes(6) + bytes([10, 0, 1, 20])


def prec(sel, f):
    assert len(f) < 256
    return bytes([sel, len(f)]) + f


web_to_db = frame(GW, M1, ipv4([10, 0, 1, 10], [10, 0, 1, 20], 6, tcp(40000, 5432)))
db_reply = frame(GW, M2, ipv4([10, 0, 1, 20], [10, 0, 1, 10], 6, tcp(5432, 40000, 0x12)))
out = frame(GW, M1, ipv4([10, 0, 1, 10], [198, 51, 100, 7], 17, udp(1234, 53)))
to_eip = frame([2, 0xE1, 0x16, 0, 0, 1], [2, 0xE1, 0x16, 0, 0, 2], ipv4([198, 51, 100, 7], [203, 0, 113, 10], 6, tcp(5555, 80)))
nlb = frame([2, 0xBB, 0, 0, 0, 1], [2, 0xBB, 0, 0, 0, 2], ipv4([10, 0, 2, 30], [10, 0, 1, 200], 6, tcp(41000, 80)))
nat = frame([2, 0xAA, 0, 0, 0, 1], [2, 0xAA, 0, 0, 0, 2], ipv4([10, 0, 1, 10], [198, 51, 100, 9], 17, udp(3000, 53)))
put("pipeline", "flows", prec(0, arp) + prec(0, web_to_db) + prec(1, db_reply) + prec(0x80, out) + prec(0x18, to_eip))
put("pipeline", "hyperplane", prec(10, nlb) + prec(0x89, nat) + prec(0x20 | 10, nlb))


# --- api_query: [split][query][body]
def api(q, body):
    return bytes([len(q)]) + q + body


put("api_query", "create-vpc", api(b"", b"Action=CreateVpc&Version=2016-11-15&CidrBlock=10.0.0.0/16"))
put("api_query", "describe-filter", api(b"Action=DescribeSubnets&Version=2016-11-15", b"&Filter.1.Name=vpc-id&Filter.1.Value.1=vpc-*&MaxResults=5"))
put("api_query", "sg-rule", api(b"", b"Action=AuthorizeSecurityGroupIngress&Version=2016-11-15&GroupId=sg-0123456789abcdef0&IpPermissions.1.IpProtocol=tcp&IpPermissions.1.FromPort=22&IpPermissions.1.ToPort=22&IpPermissions.1.IpRanges.1.CidrIp=0.0.0.0/0"))
put("api_query", "run-instances", api(b"", b"Action=RunInstances&Version=2016-11-15&ImageId=ami-0e1ab000000000001&InstanceType=t3.micro&MinCount=1&MaxCount=2&SubnetId=subnet-0123456789abcdef0"))
put("api_query", "no-action", api(b"\x05", b"CidrBlock=10.1.0.0/16&NetworkInterfaceId=eni-0123456789abcdef0&DeviceIndex=1"))
