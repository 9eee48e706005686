#!/usr/bin/env bash
# Offline check of the fabric Helm chart: lint, render (default values,
# ci/values-large.yaml and a small variant), validate every manifest against
# Kubernetes' schemas, assert the chart's invariants, and make sure
# ci/values-bad.yaml is refused.
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
