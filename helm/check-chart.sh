#!/usr/bin/env bash
# Offline check of the fabric Helm chart: lint, render it in each trust mode
# (Secrets of your own: default values, ci/values-large.yaml and a small
# variant; cert-manager: ci/values-cert-manager.yaml; insecure plaintext) and
# each coordinator state (sled; etcd: ci/values-etcd.yaml with the chart's
# own etcd, ci/values-etcd-external.yaml with an existing one over TLS),
# validate every manifest against Kubernetes' schemas (cert-manager
# Certificates, a CRD, against the check's own subset of their schema),
# assert the chart's invariants (probes on the plaintext health port, TLS
# files read-only and one identity per pod, Certificates' identities equal to
# the node ids, metrics ports, ServiceMonitors, alerts and dashboard on
# metrics the binaries serve), and make sure ci/values-bad.yaml and other bad
# values are refused.
#
# The Python tools install into a virtual environment under target/ the first
# time (that run needs the package registry); later runs reuse it and work
# offline. Set FABRIC_HELM_VENV to put the environment elsewhere.
set -euo pipefail

helm_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(dirname "$helm_dir")"
venv="${FABRIC_HELM_VENV:-$repo_root/target/helm-venv}"
requirements="$helm_dir/ci/requirements.txt"
# A copy of the requirements the environment was built from: the environment
# is reused only when it is complete and matches them.
stamp="$venv/fabric-requirements.txt"

if ! command -v python3 >/dev/null 2>&1; then
    echo "check-chart.sh: python3 is required (3.11 or newer, with the venv module)" >&2
    exit 2
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "check-chart.sh: python3 is $(python3 --version 2>&1); 3.11 or newer is required (tomllib)" >&2
    exit 2
fi

# Two checks started at once must not build the environment twice.
mkdir -p "$(dirname "$venv")"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$venv.lock"
    flock 9
fi

if [[ ! -x "$venv/bin/python" ]] || ! cmp -s "$requirements" "$stamp"; then
    echo "check-chart.sh: installing the chart check's tools into $venv" >&2
    rm -rf "$venv"
    if ! python3 -m venv "$venv"; then
        echo "check-chart.sh: python3 -m venv failed (on Debian: apt-get install python3-venv)" >&2
        exit 2
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --only-binary helm-python-sdk --requirement "$requirements"
    cp "$requirements" "$stamp"
fi

exec "$venv/bin/python" "$helm_dir/ci/check_chart.py" "$helm_dir"
