"""Start and stop an `enilab serve` for the API tests.

The daemon binds port 0 on loopback and prints the address; each daemon
gets a fresh temporary state directory. Daemons are stopped by PID.
"""
import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time

import boto3
from botocore.config import Config

_started = []


def binary():
    b = os.environ.get("ENILAB_BIN")
    if b:
        return b
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target"))
    return os.path.join(target, "debug", "enilab")


class Daemon:
    def __init__(self, state_dir=None, extra=()):
        self.own_dir = state_dir is None
        self.state_dir = state_dir or tempfile.mkdtemp(prefix="enilab-api-test-")
        self.extra = list(extra)
        self.proc = None
        self.endpoint = None
        self.start()

    def start(self):
        self.log = open(os.path.join(self.state_dir, "daemon.log"), "ab")
        self.proc = subprocess.Popen(
            [binary(), "serve", "--driver", "record", "--listen", "127.0.0.1:0", "--state-dir", self.state_dir] + self.extra,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        _started.append(self)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("listening on "):
            self.kill()
            raise RuntimeError("daemon did not start: %r (see %s/daemon.log)" % (line, self.state_dir))
        self.endpoint = line.split()[-1]

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=10)
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        if getattr(self, "log", None):
            self.log.close()
            self.log = None
        self.proc = None

    def restart(self):
        self.kill()
        self.start()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def close(self):
        self.kill()
        if self.own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def client(self, service="ec2"):
        """A boto3 client of `service` ("ec2", or "elbv2": same endpoint)."""
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="enilab",
            aws_secret_access_key="enilab",
            config=Config(retries={"max_attempts": 1, "mode": "standard"}, max_pool_connections=64),
        )


@atexit.register
def _cleanup():
    for d in _started:
        try:
            d.close()
        except Exception:
            pass


def wait_until(pred, timeout=10.0, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError("timed out waiting for " + what)
