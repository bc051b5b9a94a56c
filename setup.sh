#!/usr/bin/env bash
# enilab setup: Debian packages (QEMU 10 from bookworm-backports, DPDK, iperf3,
# tshark), hugepages, the release binary and the guest image. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

step() { printf '\n==> %s\n' "$*"; }

# --- bookworm-backports, derived from the machine's own Debian source entry ---
# We copy the existing stanza and change only the suite, so no mirror host is
# ever written into this repository.
BP=/etc/apt/sources.list.d/enilab-backports.sources
if ! apt-cache policy 2>/dev/null | grep -q 'bookworm-backports'; then
    step "enabling bookworm-backports from the existing Debian source entry"
    SRC=/etc/apt/sources.list.d/debian.sources
    if [ -f "$SRC" ]; then
        # First stanza (up to the first blank line) that lists the main suite.
        awk 'BEGIN{RS="";ORS="\n\n"} /Suites:[^\n]*bookworm( |$|\n)/ {print; exit}' "$SRC" \
          | sed -E 's/^Suites:.*/Suites: bookworm-backports/' | $SUDO tee "$BP" >/dev/null
    elif [ -f /etc/apt/sources.list ]; then
        grep -E '^deb .* bookworm( |$)' /etc/apt/sources.list | head -n1 \
          | sed -E 's/ bookworm( |$)/ bookworm-backports\1/' | $SUDO tee /etc/apt/sources.list.d/enilab-backports.list >/dev/null
    else
        echo "setup: no Debian source file found to derive bookworm-backports from" >&2
        exit 1
    fi
    $SUDO apt-get update -qq
fi

PKGS=(busybox-static iproute2 ethtool iperf3 cpio gzip xz-utils socat
      dpdk dpdk-dev tshark python3-pip python3-venv jq graphviz kmod)
need=()
for p in "${PKGS[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    step "installing Debian packages: ${need[*]}"
    echo "wireshark-common wireshark-common/install-setuid boolean false" | $SUDO debconf-set-selections
    $SUDO apt-get install -y -qq "${need[@]}" || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need[@]}"; }
fi
if ! qemu-system-x86_64 --version 2>/dev/null | grep -qE 'version (1[0-9]|[2-9][0-9])\.'; then
    step "installing QEMU 10 from bookworm-backports"
    $SUDO apt-get install -y -qq -t bookworm-backports qemu-system-x86
fi
qemu-system-x86_64 --version | head -n1

# --- hugepages for DPDK testpmd (bench and the virtio-user test) ---
if [ "$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)" -lt 1024 ]; then
    step "reserving 1024 x 2 MiB hugepages"
    echo 1024 | $SUDO tee /proc/sys/vm/nr_hugepages >/dev/null || echo "setup: could not reserve hugepages; DPDK tests will be skipped" >&2
fi
if ! mountpoint -q /dev/hugepages 2>/dev/null; then
    $SUDO mkdir -p /dev/hugepages
    $SUDO mount -t hugetlbfs nodev /dev/hugepages || echo "setup: could not mount hugetlbfs" >&2
fi

# --- boto3 and the AWS CLI for the API tests (tests/api, control/tests/api.rs) ---
if ! python3 -c 'import boto3, botocore' >/dev/null 2>&1 && ! .venv-api/bin/python3 -c 'import boto3' >/dev/null 2>&1; then
    step "installing boto3 and awscli from PyPI into .venv-api"
    python3 -m venv .venv-api
    .venv-api/bin/pip install -q boto3 awscli
fi
# The reference Prometheus parser for the /metrics tests (tests/tests/observe.rs).
if ! python3 -c 'import prometheus_client' >/dev/null 2>&1 && ! .venv-api/bin/python3 -c 'import prometheus_client' >/dev/null 2>&1; then
    step "installing prometheus_client from PyPI into .venv-api"
    [ -x .venv-api/bin/python3 ] || python3 -m venv .venv-api
    .venv-api/bin/pip install -q prometheus_client
fi

# --- cargo-fuzz for the bounded fuzz runs in CI (scripts/fuzz-ci) ---
if cargo +nightly --version >/dev/null 2>&1 && ! cargo fuzz --version >/dev/null 2>&1; then
    step "installing cargo-fuzz from crates.io"
    cargo install --locked cargo-fuzz || echo "setup: cargo-fuzz did not install; scripts/fuzz-ci will skip"
fi

# --- the release binary ---
step "building target/release/enilab"
cargo build --release --locked -p enilab-control --bin enilab

# --- the guest image ---
step "building the guest image"
target/release/enilab image build

echo
echo "setup: done"
