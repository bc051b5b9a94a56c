"""API access: SigV4 signatures checked against a credentials file, the
refusal to listen off loopback without credentials, and the per-client
request rate limit. (The body size limit is tested in test_api.py,
test_garbage's oversized cases.)

Run: python3 tests/api/test_auth.py  (ENILAB_BIN points at the enilab binary)
"""
import datetime
import hashlib
import hmac
import http.client
import os
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import boto3  # noqa: E402
from botocore.auth import SigV4QueryAuth  # noqa: E402
from botocore.awsrequest import AWSRequest  # noqa: E402
from botocore.config import Config  # noqa: E402
from botocore.credentials import Credentials  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

from harness import Daemon, binary  # noqa: E402

KEY = "AKIAENILABTEST000001"
SECRET = "enilab/secret+key/for-tests-only"
BODY = "Action=DescribeVpcs&Version=2016-11-15"


def sign_post(endpoint, body, when, secret=SECRET, key=KEY):
    """SigV4 headers for a POST of `body`, computed independently of
    botocore so that the timestamp can be chosen."""
    host = urllib.parse.urlparse(endpoint).netloc
    amz = when.strftime("%Y%m%dT%H%M%SZ")
    date = amz[:8]
    ctype = "application/x-www-form-urlencoded; charset=utf-8"
    canonical = "\n".join([
        "POST", "/", "",
        "content-type:%s\nhost:%s\nx-amz-date:%s\n" % (ctype, host, amz),
        "content-type;host;x-amz-date",
        hashlib.sha256(body.encode()).hexdigest(),
    ])
    scope = "%s/us-east-1/ec2/aws4_request" % date
    sts = "AWS4-HMAC-SHA256\n%s\n%s\n%s" % (amz, scope, hashlib.sha256(canonical.encode()).hexdigest())
    k = ("AWS4" + secret).encode()
    for part in (date, "us-east-1", "ec2", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
    return {
        "Content-Type": ctype,
        "X-Amz-Date": amz,
        "Authorization": "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=content-type;host;x-amz-date, Signature=%s"
        % (key, scope, sig),
    }


def post(endpoint, body, headers):
    u = urllib.parse.urlparse(endpoint)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        c.request("POST", "/", body=body, headers=headers)
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


def get(endpoint, path_query):
    u = urllib.parse.urlparse(endpoint)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        c.request("GET", path_query)
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


def client(endpoint, key=KEY, secret=SECRET):
    return boto3.client(
        "ec2",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )


class Auth(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.creds = tempfile.NamedTemporaryFile("w", prefix="enilab-creds-", delete=False)
        cls.creds.write("# test keys\n%s %s\nAKIAENILABOTHER00002 other-secret\n" % (KEY, SECRET))
        cls.creds.close()
        cls.d = Daemon(extra=["--credentials", cls.creds.name, "--require-auth"])

    @classmethod
    def tearDownClass(cls):
        cls.d.close()
        os.unlink(cls.creds.name)

    def code(self, fn):
        with self.assertRaises(ClientError) as cm:
            fn()
        e = cm.exception.response
        return e["Error"]["Code"], e["ResponseMetadata"]["HTTPStatusCode"]

    def test_right_key_works(self):
        ec2 = client(self.d.endpoint)
        vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
        self.assertIn(vpc, [v["VpcId"] for v in ec2.describe_vpcs()["Vpcs"]])
        # The second key pair in the file works too.
        other = client(self.d.endpoint, "AKIAENILABOTHER00002", "other-secret")
        self.assertTrue(other.describe_vpcs()["Vpcs"])
        # Our own signer agrees with botocore's.
        status, body = post(self.d.endpoint, BODY, sign_post(self.d.endpoint, BODY, datetime.datetime.utcnow()))
        self.assertEqual(status, 200, body)

    def test_wrong_secret(self):
        ec2 = client(self.d.endpoint, secret="not-the-secret")
        self.assertEqual(self.code(ec2.describe_vpcs), ("SignatureDoesNotMatch", 403))

    def test_unknown_key(self):
        ec2 = client(self.d.endpoint, key="AKIAUNKNOWN000000000")
        self.assertEqual(self.code(ec2.describe_vpcs), ("AuthFailure", 401))

    def test_missing_signature(self):
        status, body = post(self.d.endpoint, BODY, {"Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual(status, 403, body)
        self.assertIn("<Code>MissingAuthenticationToken</Code>", body)
        status, body = get(self.d.endpoint, "/?" + BODY)
        self.assertIn("<Code>MissingAuthenticationToken</Code>", body)

    def test_expired_timestamp(self):
        old = datetime.datetime.utcnow() - datetime.timedelta(minutes=20)
        status, body = post(self.d.endpoint, BODY, sign_post(self.d.endpoint, BODY, old))
        self.assertEqual(status, 400, body)
        self.assertIn("<Code>RequestExpired</Code>", body)
        # Within the 15-minute window it is accepted.
        near = datetime.datetime.utcnow() - datetime.timedelta(minutes=10)
        status, body = post(self.d.endpoint, BODY, sign_post(self.d.endpoint, BODY, near))
        self.assertEqual(status, 200, body)

    def test_tampered_body(self):
        h = sign_post(self.d.endpoint, BODY, datetime.datetime.utcnow())
        status, body = post(self.d.endpoint, "Action=DescribeSubnets&Version=2016-11-15", h)
        self.assertEqual(status, 403, body)
        self.assertIn("<Code>SignatureDoesNotMatch</Code>", body)

    def test_presigned_get(self):
        host = urllib.parse.urlparse(self.d.endpoint).netloc
        url = self.d.endpoint + "/?" + BODY
        req = AWSRequest(method="GET", url=url, headers={"Host": host})
        SigV4QueryAuth(Credentials(KEY, SECRET), "ec2", "us-east-1", expires=60).add_auth(req)
        path = req.url[len(self.d.endpoint):]
        status, body = get(self.d.endpoint, path)
        self.assertEqual(status, 200, body)
        self.assertIn("DescribeVpcsResponse", body)
        status, body = get(self.d.endpoint, path.replace("DescribeVpcs", "DescribeSubnets"))
        self.assertIn("<Code>SignatureDoesNotMatch</Code>", body)


class StartUp(unittest.TestCase):
    def run_serve(self, *args):
        with tempfile.TemporaryDirectory(prefix="enilab-auth-") as d:
            p = subprocess.run(
                [binary(), "serve", "--driver", "record", "--state-dir", d] + list(args),
                capture_output=True, timeout=30,
            )
            return p.returncode, p.stderr.decode()

    def test_non_loopback_without_credentials_is_refused(self):
        rc, err = self.run_serve("--listen", "0.0.0.0:0")
        self.assertNotEqual(rc, 0)
        self.assertIn("requires --credentials", err)

    def test_require_auth_without_credentials_is_refused(self):
        rc, err = self.run_serve("--listen", "127.0.0.1:0", "--require-auth")
        self.assertNotEqual(rc, 0)
        self.assertIn("--require-auth needs --credentials", err)


class Limits(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # 2/s: slow enough that a loaded host (debug daemon, Python
        # clients at 100+ ms a call) still drains the bucket; at 5/s a
        # loaded run refilled as fast as boto3 called.
        cls.d = Daemon(extra=["--rate-limit", "2", "--rate-burst", "10"])

    @classmethod
    def tearDownClass(cls):
        cls.d.close()

    def burst(self, n):
        codes = []
        for _ in range(n):
            status, body = post(self.d.endpoint, BODY, {"Content-Type": "application/x-www-form-urlencoded"})
            if status == 503:
                self.assertIn("<Code>RequestLimitExceeded</Code>", body)
            codes.append(status)
        return codes

    def test_burst_is_limited_and_recovers(self):
        # Made first: building a boto3 client takes long enough on a
        # loaded host to refill the bucket it is meant to find empty.
        ec2 = client(self.d.endpoint)
        codes = self.burst(40)
        # At most the burst plus what 2/s refills while 40 requests run.
        self.assertGreaterEqual(codes.count(503), 20, codes)
        self.assertGreaterEqual(codes.count(200), 10, codes)
        self.assertEqual(set(codes), {200, 503})
        # boto3 sees EC2's code (with retries off).
        with self.assertRaises(ClientError) as cm:
            for _ in range(40):
                ec2.describe_vpcs()
        self.assertEqual(cm.exception.response["Error"]["Code"], "RequestLimitExceeded")
        self.assertEqual(cm.exception.response["ResponseMetadata"]["HTTPStatusCode"], 503)
        time.sleep(4.5)  # refills 9 tokens at 2/s (capped at the burst)
        codes = self.burst(8)
        self.assertEqual(codes, [200] * 8)


if __name__ == "__main__":
    unittest.main()
