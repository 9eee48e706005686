"""Offline checks of the fabric Helm chart.

Owns: linting the chart, rendering it with its default values and with
ci/values-large.yaml, validating every rendered manifest against pinned
Kubernetes schemas, the chart's own invariants (gRPC probes on the ports the
binaries listen on, replicas as asked, hardened containers), and the schema's
refusal of bad values. It uses Helm's own Go library (through helm-python-sdk)
and the schemas shipped in kubernetes-validate: no cluster, no helm binary,
no network.

Must never: contact a cluster or the network, or modify the chart.

Usage: check_chart.py HELM_DIR   (HELM_DIR holds fabric/ and ci/)
Exit status: 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

import helm_python as helm
import kubernetes_validate
import yaml

# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion: native
# gRPC probes are GA from 1.27) and a current one. kubernetes-validate ships
# the schemas of both, so the validation is offline.
KUBERNETES_VERSIONS = ("1.27.0", "1.34.0")
RELEASE_NAME = "ci"
NAMESPACE = "fabric-ci"

# The port each binary listens on by default, i.e. what the chart must probe.
BINARY_PORTS = {
    "/usr/local/bin/fabric-coordinator": 7400,
    "/usr/local/bin/fabric-node": 7401,
}
SMALL_VARIANT = {
    "agent": {"enabled": True, "readAllFiles": False},
    "storage": {"replicas": 1, "antiAffinity": "none", "podDisruptionBudget": {"enabled": False}},
    "serviceAccount": {"create": False},
    "networkPolicy": {"enabled": True},
}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
WORKLOAD_KINDS = ("StatefulSet", "DaemonSet", "Deployment")


class CheckFailed(Exception):
    """One check's assertion did not hold; the message says what and where."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


class Report:
    """Runs named checks, keeps going after a failure, prints a summary."""

    def __init__(self) -> None:
        self.passed: list[str] = []
        self.failed: list[tuple[str, str]] = []

    def check(self, name: str, body: Callable[[], str | None]) -> None:
        started = time.monotonic()
        try:
            detail = body()
        except CheckFailed as failure:
            self.failed.append((name, str(failure)))
            print(f"FAIL  {name}\n      {failure}", flush=True)
            return
        except helm.HelmError as failure:
            self.failed.append((name, f"helm: {failure}"))
            print(f"FAIL  {name}\n      helm: {failure}", flush=True)
            return
        except (KeyError, IndexError, TypeError, AttributeError) as failure:
            # A rendered manifest lacks a field the check looks at.
            message = f"unexpected manifest shape: {type(failure).__name__}: {failure}"
            self.failed.append((name, message))
            print(f"FAIL  {name}\n      {message}", flush=True)
            return
        self.passed.append(name)
        elapsed = time.monotonic() - started
        suffix = f" ({detail})" if detail else ""
        print(f"ok    {name}{suffix} [{elapsed:.2f}s]", flush=True)

    def summary(self) -> int:
        print()
        if self.failed:
            print("Failed checks:")
            for name, failure in self.failed:
                print(f"  - {name}: {failure}")
        print(f"{len(self.passed)} passed, {len(self.failed)} failed")
        return 1 if self.failed else 0


def load_values_file(path: Path) -> dict[str, Any]:
    """Parse a values file with Helm's own YAML parser (as `helm -f` would)."""
    return helm.values_from_yaml(path.read_text(encoding="utf-8"))


def render(chart: helm.Chart, values: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Render the chart; return its manifests (parsed) and its NOTES.txt."""
    rendered = chart.render(values, name=RELEASE_NAME, namespace=NAMESPACE, is_install=True)
    manifests: list[dict[str, Any]] = []
    notes = ""
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            notes = text
            continue
        for document in yaml.safe_load_all(text):
            if document:
                document.setdefault("__template__", template)
                manifests.append(document)
    return manifests, notes


def describe(manifest: dict[str, Any]) -> str:
    return f"{manifest['kind']}/{manifest['metadata']['name']} ({manifest['__template__']})"


def lint(chart_dir: Path, values: dict[str, Any], label: str) -> str:
    report = helm.lint(
        chart_dir, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBERNETES_VERSIONS[0]}"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2] + [
        {"path": "", "error": e} for e in report["errors"]
    ]
    require(
        not problems,
        f"helm lint ({label}): " + "; ".join(f"{p['path']}: {p['error']}" for p in problems),
    )
    infos = [m["error"] for m in report["messages"]]
    return f"{len(infos)} info: {', '.join(infos)}" if infos else "clean"


def validate_manifests(manifests: list[dict[str, Any]]) -> str:
    errors = []
    for manifest in manifests:
        document = {k: v for k, v in manifest.items() if k != "__template__"}
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = "/".join(str(p) for p in error.path)
                errors.append(f"{describe(manifest)} against {version}: {path}: {error.message}")
            except kubernetes_validate.SchemaNotFoundError as error:
                errors.append(f"{describe(manifest)}: {error.message}")
    require(not errors, "\n      ".join(errors))
    return f"{len(manifests)} manifests x Kubernetes {', '.join(KUBERNETES_VERSIONS)}, strict"


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def component_of(manifest: dict[str, Any]) -> str:
    return manifest["metadata"]["labels"].get("app.kubernetes.io/component", "")


def one(manifests: list[dict[str, Any]], kind: str, component: str) -> dict[str, Any]:
    found = [m for m in by_kind(manifests, kind) if component_of(m) == component]
    require(len(found) == 1, f"expected one {kind} of component {component}, found {len(found)}")
    return found[0]


def config_files(manifests: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Every TOML file of every ConfigMap, parsed, keyed by (configmap, key)."""
    files = {}
    for configmap in by_kind(manifests, "ConfigMap"):
        for key, text in configmap.get("data", {}).items():
            if key.endswith(".toml"):
                try:
                    files[(configmap["metadata"]["name"], key)] = tomllib.loads(text)
                except tomllib.TOMLDecodeError as error:
                    raise CheckFailed(f"ConfigMap {configmap['metadata']['name']} key {key}: {error}")
    return files


def container_config(
    workload: dict[str, Any], container: dict[str, Any], files: dict[tuple[str, str], dict[str, Any]]
) -> dict[str, Any]:
    """The parsed config file a container is started with (--config PATH)."""
    where = f"{describe(workload)} container {container['name']}"
    command = container.get("command", []) + container.get("args", [])
    require("--config" in command, f"{where}: no --config in its command {command}")
    config_path = command[command.index("--config") + 1]
    pod = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        if "configMap" not in volume:
            continue
        configmap = volume["configMap"]["name"]
        if mount["mountPath"] == config_path and "subPath" in mount:
            key = mount["subPath"]
        elif config_path.startswith(mount["mountPath"].rstrip("/") + "/") and "subPath" not in mount:
            key = config_path[len(mount["mountPath"].rstrip("/")) + 1 :]
        else:
            continue
        require(
            (configmap, key) in files,
            f"{where}: --config {config_path} is ConfigMap {configmap} key {key}, which does not exist",
        )
        require(mount.get("readOnly") is True, f"{where}: config mount {mount['mountPath']} is not read-only")
        return files[(configmap, key)]
    raise CheckFailed(f"{where}: --config {config_path} is not mounted from a ConfigMap")


def listen_port(listen: str, where: str) -> int:
    _host, separator, port = listen.rpartition(":")
    require(bool(separator) and port.isdigit(), f"{where}: listen {listen!r} is not host:port")
    return int(port)


def check_servers(manifests: list[dict[str, Any]], merged: dict[str, Any]) -> str:
    """Probes are gRPC probes on the port the binary listens on, everywhere."""
    files = config_files(manifests)
    seen = []
    for workload in (m for kind in WORKLOAD_KINDS for m in by_kind(manifests, kind)):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            where = f"{describe(workload)} container {container['name']}"
            binary = container.get("command", [""])[0]
            require(binary in BINARY_PORTS, f"{where}: runs {binary!r}, not one of {sorted(BINARY_PORTS)}")
            expected = BINARY_PORTS[binary]
            config = container_config(workload, container, files)
            require("listen" in config, f"{where}: its config file has no `listen`")
            configured = listen_port(config["listen"], where)
            require(
                configured == expected,
                f"{where}: config listen {config['listen']} is not the binary's port {expected}",
            )
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            require(
                ports.get("grpc") == expected,
                f"{where}: containerPort grpc is {ports.get('grpc')}, expected {expected}",
            )
            for probe_name in PROBES:
                probe = container.get(probe_name)
                require(probe is not None, f"{where}: no {probe_name}")
                require("grpc" in probe, f"{where}: {probe_name} is not a grpc probe: {sorted(probe)}")
                require(
                    probe["grpc"].get("port") == expected,
                    f"{where}: {probe_name} probes port {probe['grpc'].get('port')}, the binary listens on {expected}",
                )
                require(
                    probe["grpc"].get("service", "") == "",
                    f"{where}: {probe_name} asks service {probe['grpc'].get('service')!r}, not the server's overall health",
                )
            seen.append(f"{workload['metadata']['name']}:{expected}")

    # The coordinator address the nodes dial is its Service, on its port.
    coordinator_service = one_service(manifests, "coordinator", headless=False)
    service_port = coordinator_service["spec"]["ports"][0]["port"]
    require(
        service_port == BINARY_PORTS["/usr/local/bin/fabric-coordinator"],
        f"coordinator Service port is {service_port}",
    )
    expected_url = f"http://{coordinator_service['metadata']['name']}.{NAMESPACE}.svc.{merged['clusterDomain']}:{service_port}"
    for (configmap, key), config in files.items():
        if "coordinator" in config:
            require(
                config["coordinator"] == expected_url,
                f"ConfigMap {configmap} {key}: coordinator {config['coordinator']!r}, expected {expected_url!r}",
            )
    return ", ".join(seen)


def one_service(manifests: list[dict[str, Any]], component: str, headless: bool) -> dict[str, Any]:
    found = [
        s
        for s in by_kind(manifests, "Service")
        if component_of(s) == component and (s["spec"].get("clusterIP") == "None") == headless
    ]
    require(
        len(found) == 1,
        f"expected one {'headless ' if headless else ''}Service of {component}, found {len(found)}",
    )
    return found[0]


def check_statefulsets(manifests: list[dict[str, Any]], merged: dict[str, Any]) -> str:
    coordinator = one(manifests, "StatefulSet", "coordinator")
    storage = one(manifests, "StatefulSet", "storage")
    require(
        coordinator["spec"]["replicas"] == 1,
        f"coordinator replicas {coordinator['spec']['replicas']}, expected 1",
    )
    wanted = merged["storage"]["replicas"]
    require(
        storage["spec"]["replicas"] == wanted,
        f"storage replicas {storage['spec']['replicas']}, values say {wanted}",
    )

    for statefulset, component in ((coordinator, "coordinator"), (storage, "storage")):
        headless = one_service(manifests, component, headless=True)
        require(
            statefulset["spec"]["serviceName"] == headless["metadata"]["name"],
            f"{describe(statefulset)}: serviceName {statefulset['spec']['serviceName']} is not its headless Service",
        )
        claims = statefulset["spec"].get("volumeClaimTemplates", [])
        require(
            len(claims) == 1 and claims[0]["metadata"]["name"] == "data",
            f"{describe(statefulset)}: expected one claim `data`",
        )
        size = claims[0]["spec"]["resources"]["requests"]["storage"]
        require(
            size == merged[component]["persistence"]["size"], f"{describe(statefulset)}: claim size {size}"
        )
        container = statefulset["spec"]["template"]["spec"]["containers"][0]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        config = container_config(statefulset, container, config_files(manifests))
        require(
            mounts.get("data") == config.get("data_dir"),
            f"{describe(statefulset)}: data_dir {config.get('data_dir')} is not the claim's mount {mounts.get('data')}",
        )

    # Each storage node's id and advertised address is its stable pod DNS name.
    env = {e["name"]: e for e in storage["spec"]["template"]["spec"]["containers"][0]["env"]}
    require(
        env.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
        "storage: POD_NAME is not the pod's name",
    )
    expected_id = f"$(POD_NAME).{storage['spec']['serviceName']}.{NAMESPACE}.svc.{merged['clusterDomain']}"
    require(
        env.get("FABRIC_NODE_ID", {}).get("value") == expected_id,
        f"storage: FABRIC_NODE_ID {env.get('FABRIC_NODE_ID')}, expected {expected_id}",
    )
    expected_advertise = f"http://$(FABRIC_NODE_ID):{BINARY_PORTS['/usr/local/bin/fabric-node']}"
    require(
        env.get("FABRIC_NODE_ADVERTISE", {}).get("value") == expected_advertise,
        f"storage: FABRIC_NODE_ADVERTISE {env.get('FABRIC_NODE_ADVERTISE')}",
    )
    names = list(env)
    require(
        names.index("POD_NAME") < names.index("FABRIC_NODE_ID") < names.index("FABRIC_NODE_ADVERTISE"),
        "storage: env vars must be defined before they are referenced",
    )

    anti_affinity = storage["spec"]["template"]["spec"].get("affinity", {}).get("podAntiAffinity")
    if merged["storage"]["antiAffinity"] != "none" and not merged["storage"]["affinity"]:
        require(anti_affinity is not None, "storage: no pod anti-affinity")
    return f"coordinator 1, storage {wanted}"


def check_security(manifests: list[dict[str, Any]], merged: dict[str, Any]) -> str:
    for workload in (m for kind in WORKLOAD_KINDS for m in by_kind(manifests, kind)):
        pod = workload["spec"]["template"]["spec"]
        reads_all = component_of(workload) == "agent" and merged["agent"]["readAllFiles"]
        require(
            pod.get("automountServiceAccountToken") is False,
            f"{describe(workload)}: mounts a service account token",
        )
        for container in pod["containers"]:
            where = f"{describe(workload)} container {container['name']}"
            context = container.get("securityContext", {})
            require(context.get("readOnlyRootFilesystem") is True, f"{where}: root filesystem is writable")
            require(context.get("allowPrivilegeEscalation") is False, f"{where}: allows privilege escalation")
            capabilities = context.get("capabilities", {})
            require("ALL" in capabilities.get("drop", []), f"{where}: does not drop ALL capabilities")
            allowed = {"DAC_READ_SEARCH"} if reads_all else set()
            added = set(capabilities.get("add", []))
            require(added <= allowed, f"{where}: adds capabilities {sorted(added - allowed)}")
            non_root = context.get("runAsNonRoot", pod.get("securityContext", {}).get("runAsNonRoot"))
            require(non_root is True or reads_all, f"{where}: may run as root")
            require(container.get("resources", {}).get("requests"), f"{where}: no resource requests")
        host_paths = {v["name"] for v in pod.get("volumes", []) if "hostPath" in v}
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                if mount["name"] in host_paths:
                    require(
                        mount.get("readOnly") is True,
                        f"{describe(workload)}: host path {mount['name']} is writable",
                    )
    require(
        not by_kind(manifests, "Secret"),
        "the chart renders a Secret: credentials must be referenced, never inlined",
    )
    return "non-root, read-only root, capabilities dropped"


def check_shape(manifests: list[dict[str, Any]], merged: dict[str, Any], notes: str) -> str:
    daemonsets = by_kind(manifests, "DaemonSet")
    require(
        len(daemonsets) == (1 if merged["agent"]["enabled"] else 0),
        f"{len(daemonsets)} DaemonSets with agent.enabled={merged['agent']['enabled']}",
    )
    policies = by_kind(manifests, "NetworkPolicy")
    if merged["networkPolicy"]["enabled"]:
        protected = {component_of(p) for p in policies}
        servers = {component_of(w) for kind in WORKLOAD_KINDS for w in by_kind(manifests, kind)}
        require(
            protected == servers, f"NetworkPolicies cover {sorted(protected)}, servers are {sorted(servers)}"
        )
    else:
        require(not policies, "NetworkPolicies rendered while networkPolicy.enabled is false")
    require(
        "port-forward" in notes and "fabricctl" in notes,
        "NOTES.txt does not say how to reach the coordinator with fabricctl",
    )
    for manifest in manifests:
        require(
            manifest["metadata"].get("namespace") == NAMESPACE,
            f"{describe(manifest)}: not in the release namespace",
        )
    kinds: dict[str, int] = {}
    for manifest in manifests:
        kinds[manifest["kind"]] = kinds.get(manifest["kind"], 0) + 1
    return ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))


def check_rendering(
    report: Report, chart: helm.Chart, chart_dir: Path, label: str, values: dict[str, Any]
) -> None:
    state: dict[str, Any] = {}

    def schema_and_render() -> str:
        chart.validate_schema(values)
        state["merged"] = chart.merge_values(values)
        state["manifests"], state["notes"] = render(chart, values)
        return f"{len(state['manifests'])} manifests"

    report.check(f"{label}: lint", lambda: lint(chart_dir, values, label))
    report.check(f"{label}: schema accepts the values, chart renders", schema_and_render)
    if "manifests" not in state:
        return
    manifests, merged = state["manifests"], state["merged"]
    report.check(f"{label}: Kubernetes schema validation", lambda: validate_manifests(manifests))
    report.check(
        f"{label}: gRPC probes on the ports the binaries listen on", lambda: check_servers(manifests, merged)
    )
    report.check(f"{label}: StatefulSets, claims, node ids", lambda: check_statefulsets(manifests, merged))
    report.check(f"{label}: security contexts", lambda: check_security(manifests, merged))
    report.check(
        f"{label}: optional parts, NOTES.txt", lambda: check_shape(manifests, merged, state["notes"])
    )


def expect_rejected(chart: helm.Chart, values: dict[str, Any], mentions: list[str]) -> str:
    try:
        chart.validate_schema(values)
    except helm.HelmValuesError as error:
        message = str(error)
        missing = [word for word in mentions if word not in message]
        require(not missing, f"the schema error does not name {missing}: {message}")
        try:
            chart.render(values, name=RELEASE_NAME, namespace=NAMESPACE, is_install=True)
        except helm.HelmError:
            return "rejected by validation and by render"
        return "rejected by validation (render does not validate)"
    raise CheckFailed(f"the schema accepted {values}")


def expect_lint_errors(chart_dir: Path, values: dict[str, Any]) -> str:
    report = helm.lint(chart_dir, values, strict=True, namespace=NAMESPACE)
    errors = [m for m in report["messages"] if m["severity"] >= 3]
    require(bool(errors), f"helm lint found no error: {report['messages']}")
    return f"{len(errors)} lint errors"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    helm_dir = Path(argv[1]).resolve()
    chart_dir = helm_dir / "fabric"
    started = time.monotonic()
    print(
        f"fabric chart check: Helm SDK {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__}), "
        f"kubernetes-validate {kubernetes_validate.__version__}"
    )
    report = Report()
    try:
        chart = helm.Chart.load(chart_dir)
    except helm.HelmError as error:
        print(f"FAIL  load {chart_dir}: {error}")
        return 1

    check_rendering(report, chart, chart_dir, "default values", {})
    large_file = helm_dir / "ci" / "values-large.yaml"
    check_rendering(report, chart, chart_dir, large_file.name, load_values_file(large_file))

    # The agent as a plain non-root user, and the other switches turned off.
    check_rendering(report, chart, chart_dir, "small variant", SMALL_VARIANT)

    bad_file = helm_dir / "ci" / "values-bad.yaml"
    report.check(
        f"{bad_file.name} is rejected by the schema",
        lambda: expect_rejected(chart, load_values_file(bad_file), ["replicas", "size", "port"]),
    )
    report.check(
        f"{bad_file.name} fails helm lint", lambda: expect_lint_errors(chart_dir, load_values_file(bad_file))
    )
    bad_cases = {
        "0 storage nodes": ({"storage": {"replicas": 0}}, ["replicas"]),
        "a negative volume size": ({"storage": {"persistence": {"size": "-1Gi"}}}, ["size"]),
        "a zero volume size": ({"coordinator": {"persistence": {"size": "0"}}}, ["size"]),
        "a misspelt key": ({"storage": {"replica": 3}}, ["replica"]),
        "an unknown log format": ({"logFormat": "xml"}, ["logFormat"]),
        "a bad heartbeat duration": ({"coordinator": {"heartbeatInterval": "soon"}}, ["heartbeatInterval"]),
        "a relative host path": (
            {"agent": {"enabled": True, "hostPaths": [{"name": "etc", "path": "etc"}]}},
            ["path"],
        ),
    }
    for label, (values, mentions) in bad_cases.items():
        report.check(
            f"schema rejects {label}",
            lambda values=values, mentions=mentions: expect_rejected(chart, values, mentions),
        )

    status = report.summary()
    print(f"chart check took {time.monotonic() - started:.1f}s")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
