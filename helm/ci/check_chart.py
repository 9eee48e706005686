"""Offline checks of the fabric Helm chart.

Owns: linting the chart, rendering it in each of its trust modes (Secrets of
your own: the default values and ci/values-large.yaml; cert-manager:
ci/values-cert-manager.yaml; insecure plaintext: a variant), with its
monitoring objects on, and with the coordinator's state in etcd (the chart's
own 3-member etcd: ci/values-etcd.yaml; an existing etcd over TLS:
ci/values-etcd-external.yaml; a 1-member etcd over TLS: a variant), validating every rendered manifest against pinned
Kubernetes schemas, the chart's own invariants (gRPC probes on the plaintext
health port each binary serves, metrics ports where metrics_listen says,
ServiceMonitors on the Services' metrics ports, alerts and dashboard panels
only on metrics README's Metrics section lists,
every server's TLS files mounted read-only from one identity per pod (the
coordinators share theirs), the
cert-manager Certificates' identities equal to the node ids, replicas as
asked, hardened containers; the coordinator's etcd settings, leader
readiness, update strategy and leader address, the PodDisruptionBudgets, the
chart's etcd clustered by DNS names and reachable only by the coordinators),
and the schema's and the templates' refusal of bad values. It uses
Helm's own Go library (through helm-python-sdk) and the schemas shipped in
kubernetes-validate: no cluster, no helm binary, no network. cert-manager's
Certificate is a CRD that kubernetes-validate does not ship: it is validated
against CERTIFICATE_SCHEMA below, a subset of cert-manager's v1 schema; the
Prometheus Operator's ServiceMonitor and PrometheusRule likewise.

Must never: contact a cluster or the network, or modify the chart.

Usage: check_chart.py HELM_DIR   (HELM_DIR holds fabric/ and ci/)
Exit status: 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion: native
# gRPC probes are GA from 1.27) and a current one. kubernetes-validate ships
# the schemas of both, so the validation is offline.
KUBERNETES_VERSIONS = ("1.27.0", "1.34.0")
RELEASE_NAME = "ci"
NAMESPACE = "fabric-ci"

# The port each binary listens on by default (its TLS gRPC port).
BINARY_PORTS = {
    "/usr/local/bin/fabric-coordinator": 7400,
    "/usr/local/bin/fabric-node": 7401,
}
# Each binary's default health_listen: the plaintext port serving only
# grpc.health.v1, the one the probes must ask (kubelet has no client
# certificate for the TLS port).
BINARY_HEALTH_LISTEN = {
    "/usr/local/bin/fabric-coordinator": "0.0.0.0:7420",
    "/usr/local/bin/fabric-node": "0.0.0.0:7421",
}
# Each binary's default metrics_listen (its metrics port, GET /metrics).
BINARY_METRICS_LISTEN = {
    "/usr/local/bin/fabric-coordinator": "0.0.0.0:7410",
    "/usr/local/bin/fabric-node": "0.0.0.0:7411",
}
# The prefix of each binary's environment variables (FABRIC_NODE_TLS_CERT...).
BINARY_ENV_PREFIX = {
    "/usr/local/bin/fabric-coordinator": "FABRIC_COORDINATOR_",
    "/usr/local/bin/fabric-node": "FABRIC_NODE_",
}
TLS_FLAGS = {"--tls-cert": "tls.crt", "--tls-key": "tls.key", "--tls-ca": "ca.crt"}
# A name an identity may carry (fabric-trust's validate_name).
IDENTITY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
SMALL_VARIANT = {
    "metrics": {"enabled": False},
    "agent": {"enabled": True, "readAllFiles": False},
    "storage": {"replicas": 1, "antiAffinity": "none", "podDisruptionBudget": {"enabled": False}},
    "serviceAccount": {"create": False},
    "networkPolicy": {"enabled": True},
}
# Mode C: no TLS at all, every part on.
INSECURE_VARIANT = {
    "insecure": {"plaintext": True},
    "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    "agent": {"enabled": True},
    "networkPolicy": {"enabled": True},
}
# The chart's own etcd with one member, over TLS (the members' Secret and the
# coordinators' client Secret under their default names), every live
# coordinator ready, the other NetworkPolicies off (etcd's stays).
ETCD_SMALL_VARIANT = {
    "coordinator": {"state": "etcd", "replicas": 2, "readiness": "live", "podDisruptionBudget": {"enabled": False}},
    "etcd": {"tls": {"enabled": True}, "deploy": {"enabled": True, "replicas": 1}},
    "metrics": {"enabled": False},
}
# Monitoring on: ServiceMonitors with a monitor certificate and, for the
# coordinator, a token; the alerts; the dashboard; scrapers let through the
# NetworkPolicies.
MONITORING_VARIANT = {
    "agent": {"enabled": True},
    "networkPolicy": {
        "enabled": True,
        "metricsIngressFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
    },
    "metrics": {
        "serviceMonitor": {
            "enabled": True,
            "labels": {"release": "prometheus"},
            "tlsConfig": {
                "ca": {"secret": {"name": "fabric-monitor", "key": "ca.crt"}},
                "cert": {"secret": {"name": "fabric-monitor", "key": "tls.crt"}},
                "keySecret": {"name": "fabric-monitor", "key": "tls.key"},
                "serverName": "fabric",
            },
            "coordinatorBearerTokenSecret": {"name": "fabric-monitor-token", "key": "token"},
        },
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
        "grafanaDashboard": {"enabled": True},
    },
}
# The Prometheus Operator's ServiceMonitor and PrometheusRule
# (monitoring.coreos.com/v1) are CRDs too: validated against the subsets of
# their schemas the chart uses, strict.
SECRET_KEY_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "key"],
    "properties": {"name": {"type": "string"}, "key": {"type": "string"}, "optional": {"type": "boolean"}},
}
SECRET_OR_CONFIGMAP = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"secret": SECRET_KEY_SELECTOR, "configMap": SECRET_KEY_SELECTOR},
}
CR_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
PROMETHEUS_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": CR_METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": PROMETHEUS_DURATION,
                            "scrapeTimeout": PROMETHEUS_DURATION,
                            "honorLabels": {"type": "boolean"},
                            "tlsConfig": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "ca": SECRET_OR_CONFIGMAP,
                                    "cert": SECRET_OR_CONFIGMAP,
                                    "keySecret": SECRET_KEY_SELECTOR,
                                    "serverName": {"type": "string"},
                                    "insecureSkipVerify": {"type": "boolean"},
                                    "minVersion": {"enum": ["TLS10", "TLS11", "TLS12", "TLS13"]},
                                    "maxVersion": {"enum": ["TLS10", "TLS11", "TLS12", "TLS13"]},
                                    "caFile": {"type": "string"},
                                    "certFile": {"type": "string"},
                                    "keyFile": {"type": "string"},
                                },
                            },
                            "authorization": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"type": {"type": "string"}, "credentials": SECRET_KEY_SELECTOR},
                            },
                        },
                    },
                },
            },
        },
    },
}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": CR_METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": PROMETHEUS_DURATION,
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["expr"],
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "record": {"type": "string"},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": PROMETHEUS_DURATION,
                                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
# cert-manager's Certificate (cert-manager.io/v1) is a CRD, absent from the
# Kubernetes schemas kubernetes-validate ships. This is the subset of its
# schema the chart uses, strict (an unknown or misspelt field fails), so the
# rendered Certificates are still validated offline.
CERTIFICATE_USAGES = [
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime",
    "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
    "microsoft sgc", "netscape sgc",
]
CERTIFICATE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Certificate"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretName", "issuerRef"],
            "properties": {
                "secretName": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"},
                "secretTemplate": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                    },
                },
                "commonName": {"type": "string"},
                "dnsNames": {"type": "array", "items": {"type": "string"}},
                "ipAddresses": {"type": "array", "items": {"type": "string"}},
                "uris": {"type": "array", "items": {"type": "string"}},
                "duration": {"type": "string"},
                "renewBefore": {"type": "string"},
                "privateKey": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                        "size": {"type": "integer"},
                    },
                },
                "usages": {"type": "array", "items": {"enum": CERTIFICATE_USAGES}},
                "issuerRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "kind": {"type": "string"},
                        "group": {"type": "string"},
                    },
                },
            },
        },
    },
}
# Kinds that are not in Kubernetes' schemas: validated against these instead.
CRD_SCHEMAS = {
    ("cert-manager.io/v1", "Certificate"): CERTIFICATE_SCHEMA,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE_SCHEMA,
}
# The alerts the chart's PrometheusRule must carry.
EXPECTED_ALERTS = {"FabricJobStale", "FabricNodeLost", "FabricUnderReplicated", "FabricDamagedSnapshot"}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
WORKLOAD_KINDS = ("StatefulSet", "DaemonSet", "Deployment")
# The components that run a fabric binary; the chart's etcd is the other one.
FABRIC_COMPONENTS = ("coordinator", "storage", "agent")
# The health service SERVING only on the leading coordinator (the empty name
# is SERVING on every live one).
LEADER_HEALTH_SERVICE = "fabric.v1.Coordinator"


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
    crds = 0
    for manifest in manifests:
        document = {k: v for k, v in manifest.items() if k != "__template__"}
        crd_schema = CRD_SCHEMAS.get((manifest.get("apiVersion"), manifest.get("kind")))
        if crd_schema is not None:
            # Not a Kubernetes kind: the chart check's own subset of its schema.
            crds += 1
            for error in jsonschema.Draft7Validator(crd_schema).iter_errors(document):
                path = "/".join(str(p) for p in error.path)
                errors.append(f"{describe(manifest)} against the check's CRD subset: {path}: {error.message}")
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = "/".join(str(p) for p in error.path)
                errors.append(f"{describe(manifest)} against {version}: {path}: {error.message}")
            except kubernetes_validate.SchemaNotFoundError as error:
                errors.append(f"{describe(manifest)}: {error.message}")
    require(not errors, "\n      ".join(errors))
    detail = f"{len(manifests) - crds} manifests x Kubernetes {', '.join(KUBERNETES_VERSIONS)}, strict"
    if crds:
        detail += f"; {crds} custom resources against the check's subsets of their CRD schemas"
    return detail


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


def command_of(container: dict[str, Any]) -> list[str]:
    return container.get("command", []) + container.get("args", [])


def flag_value(command: list[str], flag: str) -> str | None:
    """The value of `--flag VALUE` or `--flag=VALUE` in a command line, if given."""
    for index, word in enumerate(command):
        if word == flag:
            require(index + 1 < len(command), f"{flag} without a value in {command}")
            return command[index + 1]
        if word.startswith(flag + "="):
            return word[len(flag) + 1 :]
    return None


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def effective_setting(
    container: dict[str, Any], config: dict[str, Any], flag: str, key: str, default: str
) -> str:
    """A setting as the binary resolves it: flag, else environment, else file, else default."""
    binary = container["command"][0]
    value = flag_value(command_of(container), flag)
    if value is not None:
        return value
    variable = env_of(container).get(BINARY_ENV_PREFIX[binary] + key.upper())
    if variable is not None:
        require("value" in variable, f"{variable['name']} is not a literal value")
        return variable["value"]
    return config.get(key, default)


def servers(manifests: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every (workload, container) of the chart; each runs a fabric server."""
    return [
        (workload, container)
        for kind in WORKLOAD_KINDS
        for workload in by_kind(manifests, kind)
        if component_of(workload) in FABRIC_COMPONENTS
        for container in workload["spec"]["template"]["spec"]["containers"]
    ]


def coordinator_readiness_service(merged: dict[str, Any]) -> str:
    """The health service the coordinator's readiness probe must ask: the
    leader's with state etcd and readiness "leader", else the server's ("")."""
    coordinator = merged["coordinator"]
    if coordinator["state"] == "etcd" and coordinator["readiness"] == "leader":
        return LEADER_HEALTH_SERVICE
    return ""


def expected_coordinator_url(merged: dict[str, Any], service: str, port: int) -> str:
    """The `coordinator` key of nodes and agents: the Service, and with state
    etcd every coordinator pod's stable DNS name after it."""
    scheme = "http" if merged["insecure"]["plaintext"] else "https"
    domain = merged["clusterDomain"]
    urls = [f"{scheme}://{service}.{NAMESPACE}.svc.{domain}:{port}"]
    if merged["coordinator"]["state"] == "etcd":
        headless = f"{service}-headless"
        urls += [
            f"{scheme}://{service}-{i}.{headless}.{NAMESPACE}.svc.{domain}:{port}"
            for i in range(merged["coordinator"]["replicas"])
        ]
    return ",".join(urls)


def check_servers(manifests: list[dict[str, Any]], merged: dict[str, Any]) -> str:
    """Probes are gRPC probes on the plaintext health port, never on the TLS port."""
    files = config_files(manifests)
    seen = []
    for workload, container in servers(manifests):
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
        require(
            flag_value(command_of(container), "--listen") is None
            and BINARY_ENV_PREFIX[binary] + "LISTEN" not in env_of(container),
            f"{where}: listen is overridden outside its config file",
        )
        health_listen = effective_setting(
            container, config, "--health-listen", "health_listen", BINARY_HEALTH_LISTEN[binary]
        )
        require(health_listen != "", f"{where}: health_listen is empty: the server has no health port to probe")
        health = listen_port(health_listen, f"{where} health_listen")
        require(health != configured, f"{where}: health port {health} is the TLS gRPC port")
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        metrics_listen = effective_setting(
            container, config, "--metrics-listen", "metrics_listen", BINARY_METRICS_LISTEN[binary]
        )
        if merged["metrics"]["enabled"]:
            require(metrics_listen != "", f"{where}: metrics are enabled but metrics_listen is empty")
            metrics = listen_port(metrics_listen, f"{where} metrics_listen")
            require(
                metrics not in (configured, health),
                f"{where}: metrics port {metrics} is its TLS gRPC or health port",
            )
            require(
                ports.get("metrics") == metrics,
                f"{where}: containerPort metrics is {ports.get('metrics')}, its metrics_listen is {metrics_listen}",
            )
        else:
            require(
                metrics_listen == "" and "metrics" not in ports,
                f"{where}: metrics are disabled but metrics_listen is {metrics_listen!r}, ports {sorted(ports)}",
            )
        require(
            ports.get("grpc") == expected,
            f"{where}: containerPort grpc is {ports.get('grpc')}, expected {expected}",
        )
        require(
            ports.get("health") == health,
            f"{where}: containerPort health is {ports.get('health')}, its health_listen is {health_listen}",
        )
        for probe_name in PROBES:
            probe = container.get(probe_name)
            require(probe is not None, f"{where}: no {probe_name}")
            require("grpc" in probe, f"{where}: {probe_name} is not a grpc probe: {sorted(probe)}")
            require(
                probe["grpc"].get("port") == health,
                f"{where}: {probe_name} probes port {probe['grpc'].get('port')}, "
                f"the plaintext health port (health_listen {health_listen}) is {health}",
            )
            # Startup and liveness ask whether the server lives (""); the
            # coordinator's readiness may ask whether it leads.
            wanted = ""
            if probe_name == "readinessProbe" and component_of(workload) == "coordinator":
                wanted = coordinator_readiness_service(merged)
            require(
                probe["grpc"].get("service", "") == wanted,
                f"{where}: {probe_name} asks service {probe['grpc'].get('service')!r}, expected {wanted!r}",
            )
        seen.append(f"{workload['metadata']['name']}:{expected}+{health}")

    # The coordinator address the nodes dial is its Service, on its port,
    # https unless insecure.plaintext.
    coordinator_service = one_service(manifests, "coordinator", headless=False)
    service_port = coordinator_service["spec"]["ports"][0]["port"]
    require(
        service_port == BINARY_PORTS["/usr/local/bin/fabric-coordinator"],
        f"coordinator Service port is {service_port}",
    )
    for service in by_kind(manifests, "Service"):
        if component_of(service) not in FABRIC_COMPONENTS:
            continue
        names = [p.get("name") for p in service["spec"]["ports"]]
        # The health port never: it is for kubelet alone. The metrics port
        # only when metrics are enabled (check_monitoring checks which).
        allowed = (["grpc"], ["grpc", "metrics"]) if merged["metrics"]["enabled"] else (["grpc"],)
        require(names in allowed, f"{describe(service)}: exposes ports {names}, expected one of {allowed}")
    expected_url = expected_coordinator_url(merged, coordinator_service["metadata"]["name"], service_port)
    for (configmap, key), config in files.items():
        if "coordinator" in config:
            require(
                config["coordinator"] == expected_url,
                f"ConfigMap {configmap} {key}: coordinator {config['coordinator']!r}, expected {expected_url!r}",
            )
    return ", ".join(seen)


def pods_of(workload: dict[str, Any], merged: dict[str, Any]) -> list[tuple[str, dict[str, str], str]]:
    """The pods a workload runs, as (label, the pod's $(VAR) values, node id).

    Storage pod N: POD_NAME is "<statefulset>-N", its id FABRIC_NODE_ID with
    that substituted. An agent: NODE_NAME is a Kubernetes node's name (those
    listed in tls.agent.nodes, or a stand-in when each node holds its own
    files). The coordinator: `coordinator.replicas` pods, no node id.
    """
    component = component_of(workload)
    container = workload["spec"]["template"]["spec"]["containers"][0]
    node_id = env_of(container).get("FABRIC_NODE_ID", {}).get("value", "")
    if component == "coordinator":
        return [(f"{workload['metadata']['name']}-{i}", {}, "") for i in range(workload["spec"]["replicas"])]
    if component == "storage":
        pods = [f"{workload['metadata']['name']}-{i}" for i in range(workload["spec"]["replicas"])]
        return [(pod, {"POD_NAME": pod}, node_id.replace("$(POD_NAME)", pod)) for pod in pods]
    require(component == "agent", f"{describe(workload)}: unknown component {component!r}")
    nodes = merged["tls"]["agent"]["nodes"] if merged["tls"]["agent"]["source"] == "secrets" else []
    nodes = nodes or ["any-kubernetes-node"]
    return [(f"agent on {node}", {"NODE_NAME": node}, node_id.replace("$(NODE_NAME)", node)) for node in nodes]


def substitute(text: str, variables: dict[str, str]) -> str:
    for name, value in variables.items():
        text = text.replace(f"$({name})", value)
    require("$(" not in text, f"{text!r} references a variable that is not the pod's")
    return text


def tls_file_source(
    workload: dict[str, Any], container: dict[str, Any], path: str, key: str, where: str
) -> tuple[dict[str, Any], str]:
    """Where a TLS file comes from: the read-only mount holding `path`, and
    the source of that file ("secret NAME" or "hostPath DIR")."""
    pod = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if "subPath" not in m and path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    require(mounts, f"{where}: {path} is on no volume")
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    require(mount.get("readOnly") is True, f"{where}: {path} is on mount {mount['mountPath']}, not read-only")
    volume = volumes[mount["name"]]
    relative = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    if "secret" in volume:
        secret = volume["secret"]
        items = {i["path"]: i["key"] for i in secret.get("items", [])} or None
        file_key = items.get(relative) if items else relative
        require(file_key == key, f"{where}: {path} is key {file_key!r} of Secret {secret['secretName']}, not {key}")
        return volume, f"secret {secret['secretName']}"
    if "projected" in volume:
        for source in volume["projected"]["sources"]:
            require(set(source) == {"secret"}, f"{where}: volume {volume['name']} projects {sorted(source)}")
            for item in source["secret"].get("items", []):
                if item["path"] == relative:
                    require(
                        item["key"] == key,
                        f"{where}: {path} is key {item['key']!r} of Secret {source['secret']['name']}, not {key}",
                    )
                    return volume, f"secret {source['secret']['name']}"
        raise CheckFailed(f"{where}: no Secret of volume {volume['name']} projects {relative}")
    if "hostPath" in volume:
        require(relative == key, f"{where}: {path} is not {key} of host directory {volume['hostPath']['path']}")
        return volume, f"hostPath {volume['hostPath']['path']}"
    raise CheckFailed(f"{where}: {path} is on volume {volume['name']}, which holds no key material: {sorted(volume)}")


def tls_sources(manifests: list[dict[str, Any]], merged: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each pod's TLS files, checked: pod label -> {component, source, node_id}.

    Every server container takes --tls-cert, --tls-key and --tls-ca, on a
    read-only mount of key material, all three from one source per pod, and
    no two pods share a source unless it is each Kubernetes node's own
    directory, or they are coordinators: every coordinator is the same
    service, fabric://coordinator/NAME, and clients accept any such name.
    """
    files = config_files(manifests)
    found: dict[str, dict[str, Any]] = {}
    for workload, container in servers(manifests):
        where = f"{describe(workload)} container {container['name']}"
        binary = container["command"][0]
        command = command_of(container)
        config = container_config(workload, container, files)
        require(
            "--insecure-plaintext" not in command
            and BINARY_ENV_PREFIX[binary] + "INSECURE_PLAINTEXT" not in env_of(container)
            and not config.get("insecure_plaintext", False),
            f"{where}: insecure plaintext while insecure.plaintext is off",
        )
        paths = {}
        for flag, key in TLS_FLAGS.items():
            value = flag_value(command, flag)
            require(value is not None, f"{where}: no {flag} in its command {command}")
            paths[flag] = (value, key)
        workload_sources = set()
        for label, variables, node_id in pods_of(workload, merged):
            sources = set()
            for flag, (value, key) in paths.items():
                path = substitute(value, variables)
                volume, source = tls_file_source(workload, container, path, key, f"{where} ({label})")
                if "hostPath" not in volume:
                    # Kubernetes' default mode for Secret files is 0644.
                    mode = volume.get("secret", volume.get("projected", {})).get("defaultMode", 0o644)
                    if mode & 0o007:
                        raise CheckFailed(
                            f"{where}: volume {volume['name']} has mode {mode:o}: key material readable by anyone"
                        )
                sources.add(source)
            require(len(sources) == 1, f"{where} ({label}): its TLS files come from {sorted(sources)}, not one source")
            source = sources.pop()
            if not source.startswith("hostPath ") and component_of(workload) != "coordinator":
                require(source not in workload_sources, f"{where}: {source} serves more than one pod")
            workload_sources.add(source)
            found[label] = {"component": component_of(workload), "source": source, "node_id": node_id}
    return found


def check_transport(manifests: list[dict[str, Any]], merged: dict[str, Any]) -> str:
    """TLS everywhere unless insecure.plaintext, and then plaintext everywhere."""
    insecure = merged["insecure"]["plaintext"]
    scheme = "http" if insecure else "https"
    for workload, container in servers(manifests):
        where = f"{describe(workload)} container {container['name']}"
        advertise = env_of(container).get("FABRIC_NODE_ADVERTISE", {}).get("value")
        if advertise is not None:
            require(advertise.startswith(f"{scheme}://"), f"{where}: advertises {advertise}, expected {scheme}://")
        # Every volume of key material is mounted read-only, wherever it is mounted.
        pod = workload["spec"]["template"]["spec"]
        secret_volumes = {
            v["name"] for v in pod.get("volumes", []) if "secret" in v or "projected" in v or "hostPath" in v
        }
        for mount in container.get("volumeMounts", []):
            if mount["name"] in secret_volumes:
                require(mount.get("readOnly") is True, f"{where}: volume {mount['name']} is mounted writable")
    if insecure:
        for workload, container in servers(manifests):
            where = f"{describe(workload)} container {container['name']}"
            command = command_of(container)
            require("--insecure-plaintext" in command, f"{where}: no --insecure-plaintext in {command}")
            flags = [flag for flag in TLS_FLAGS if flag_value(command, flag) is not None]
            require(not flags, f"{where}: {flags} with --insecure-plaintext")
            names = {v["name"] for v in workload["spec"]["template"]["spec"].get("volumes", [])}
            require("tls" not in names, f"{describe(workload)}: mounts TLS files with --insecure-plaintext")
        require(not by_kind(manifests, "Certificate"), "Certificates rendered with insecure.plaintext")
        return "every server --insecure-plaintext, http:// addresses, no TLS files"
    sources = tls_sources(manifests, merged)
    return f"{len(sources)} pods, each its own TLS files, read-only: " + ", ".join(
        sorted({s["source"].split(" ")[0] for s in sources.values()})
    )


def check_certificates(manifests: list[dict[str, Any]], merged: dict[str, Any]) -> str:
    """cert-manager's Certificates write exactly the Secrets the pods mount,
    one identity per pod: fabric://node/<node id> for each storage ordinal
    (and each listed agent), fabric://coordinator/NAME for the coordinator."""
    certificates = by_kind(manifests, "Certificate")
    certificate_manager = merged["tls"]["certManager"]
    if merged["insecure"]["plaintext"] or not certificate_manager["enabled"]:
        require(not certificates, f"{len(certificates)} Certificates rendered without tls.certManager.enabled")
        return "none (Secrets of your own)" if not merged["insecure"]["plaintext"] else "none (insecure)"
    by_secret: dict[str, dict[str, Any]] = {}
    for certificate in certificates:
        spec = certificate["spec"]
        where = describe(certificate)
        require(spec["secretName"] not in by_secret, f"{where}: Secret {spec['secretName']} written twice")
        by_secret[spec["secretName"]] = certificate
        wanted_issuer = {k: v for k, v in certificate_manager["issuerRef"].items() if v}
        require(spec["issuerRef"] == wanted_issuer, f"{where}: issuerRef {spec['issuerRef']}, values say {wanted_issuer}")
        usages = set(spec.get("usages", []))
        require(
            {"server auth", "client auth"} <= usages,
            f"{where}: usages {sorted(usages)}: a server serves and dials with it",
        )
        require(len(spec.get("uris", [])) == 1, f"{where}: uris {spec.get('uris')}: one identity expected")
    sources = tls_sources(manifests, merged)
    counts: dict[str, int] = {}
    used = set()
    for label, source in sorted(sources.items()):
        if not source["source"].startswith("secret "):
            continue
        secret = source["source"].removeprefix("secret ")
        require(secret in by_secret, f"{label}: no Certificate writes its Secret {secret}")
        used.add(secret)
        certificate = by_secret[secret]
        uri = certificate["spec"]["uris"][0]
        if source["component"] == "coordinator":
            name = uri.removeprefix("fabric://coordinator/")
            require(
                uri.startswith("fabric://coordinator/") and IDENTITY_NAME.match(name) is not None,
                f"{describe(certificate)}: {uri} is not fabric://coordinator/NAME",
            )
        else:
            expected = f"fabric://node/{source['node_id']}"
            require(
                IDENTITY_NAME.match(source["node_id"]) is not None,
                f"{label}: node id {source['node_id']!r} cannot be an identity",
            )
            require(uri == expected, f"{describe(certificate)}: {uri}, but {label} has node id {source['node_id']} ({expected})")
        counts[source["component"]] = counts.get(source["component"], 0) + 1
    stray = sorted(set(by_secret) - used)
    require(not stray, f"Certificates write Secrets no pod mounts: {stray}")
    require(
        counts.get("storage") == merged["storage"]["replicas"],
        f"{counts.get('storage')} storage Certificates for {merged['storage']['replicas']} replicas",
    )
    coordinator_secrets = {s["source"] for s in sources.values() if s["component"] == "coordinator"}
    require(
        counts.get("coordinator") == merged["coordinator"]["replicas"] and len(coordinator_secrets) == 1,
        f"{counts.get('coordinator')} coordinator pods on {sorted(coordinator_secrets)}, "
        f"expected {merged['coordinator']['replicas']} on one Certificate's Secret",
    )
    return ", ".join(f"{count} {component}" for component, count in sorted(counts.items()))


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
    etcd_state = merged["coordinator"]["state"] == "etcd"
    coordinators = merged["coordinator"]["replicas"]
    require(etcd_state or coordinators == 1, f"{coordinators} coordinators with state sled rendered")
    require(
        coordinator["spec"]["replicas"] == coordinators,
        f"coordinator replicas {coordinator['spec']['replicas']}, values say {coordinators}",
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
        if component == "coordinator" and etcd_state:
            # The state is in etcd: no claim, data_dir on scratch space, every
            # pod started at once (followers may never be ready).
            require(not claims, f"{describe(statefulset)}: claims {claims} with state etcd")
            pod = statefulset["spec"]["template"]["spec"]
            data = [v for v in pod["volumes"] if v["name"] == "data"]
            require(
                len(data) == 1 and "emptyDir" in data[0],
                f"{describe(statefulset)}: volume data is {data}, expected an emptyDir",
            )
            require(
                statefulset["spec"].get("podManagementPolicy") == "Parallel",
                f"{describe(statefulset)}: podManagementPolicy {statefulset['spec'].get('podManagementPolicy')}",
            )
            # A rolling update waits for each new pod to be ready; a follower
            # never is with readiness "leader".
            never_ready = coordinator_readiness_service(merged) == LEADER_HEALTH_SERVICE and coordinators > 1
            strategy = statefulset["spec"].get("updateStrategy", {}).get("type", "RollingUpdate")
            wanted_strategy = "OnDelete" if never_ready else "RollingUpdate"
            require(
                strategy == wanted_strategy,
                f"{describe(statefulset)}: updateStrategy {strategy}, expected {wanted_strategy}",
            )
            continue
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
    scheme = "http" if merged["insecure"]["plaintext"] else "https"
    expected_advertise = f"{scheme}://$(FABRIC_NODE_ID):{BINARY_PORTS['/usr/local/bin/fabric-node']}"
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
    return f"coordinator {coordinators} ({merged['coordinator']['state']}), storage {wanted}"


def selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in match_labels.items())


def pod_components(manifests: list[dict[str, Any]], match_labels: dict[str, str]) -> set[str]:
    """The components whose pods (the workloads' pod templates) a selector picks."""
    return {
        component_of(w)
        for kind in WORKLOAD_KINDS
        for w in by_kind(manifests, kind)
        if selects(match_labels, w["spec"]["template"]["metadata"]["labels"])
    }


def flag_values(command: list[str]) -> dict[str, str]:
    """`--flag=value` words of a command line (a bare `--flag` is "")."""
    flags = {}
    for word in command:
        if word.startswith("--"):
            name, _, value = word.partition("=")
            flags[name] = value
    return flags


def mounted_secret_file(workload: dict[str, Any], container: dict[str, Any], path: str, where: str) -> tuple[str, str]:
    """(Secret name, key) of a file on a read-only Secret mount."""
    volume, source = tls_file_source(workload, container, path, path.rsplit("/", 1)[-1], where)
    require(source.startswith("secret "), f"{where}: {path} comes from {source}, not a Secret")
    mode = volume["secret"].get("defaultMode", 0o644)
    require(not mode & 0o007, f"{where}: volume {volume['name']} has mode {mode:o}: key material readable by anyone")
    return source.removeprefix("secret "), path.rsplit("/", 1)[-1]


def check_disruption_budgets(manifests: list[dict[str, Any]], merged: dict[str, Any]) -> str:
    """A PodDisruptionBudget for the storage nodes, for several coordinators
    (one at a time, not-ready followers always evictable) and for the chart's
    3-member etcd (one at a time: two keep quorum); each selects exactly its
    component's pods."""
    budgets = {component_of(b): b for b in by_kind(manifests, "PodDisruptionBudget")}
    require(
        len(budgets) == len(by_kind(manifests, "PodDisruptionBudget")),
        "two PodDisruptionBudgets for one component",
    )
    coordinator, etcd = merged["coordinator"], merged["etcd"]["deploy"]
    wanted = {
        "storage": merged["storage"]["podDisruptionBudget"]["enabled"],
        "coordinator": coordinator["podDisruptionBudget"]["enabled"]
        and coordinator["state"] == "etcd"
        and coordinator["replicas"] > 1,
        "etcd": etcd["enabled"] and etcd["podDisruptionBudget"]["enabled"] and etcd["replicas"] > 1,
    }
    for component, expected in wanted.items():
        require(
            (component in budgets) == expected,
            f"{component}: PodDisruptionBudget {'missing' if expected else 'rendered'}",
        )
    for component, budget in budgets.items():
        spec = budget["spec"]
        picked = pod_components(manifests, spec["selector"]["matchLabels"])
        require(picked == {component}, f"{describe(budget)}: selects the pods of {sorted(picked)}")
        if component == "coordinator":
            require(spec.get("maxUnavailable") == 1, f"{describe(budget)}: maxUnavailable {spec.get('maxUnavailable')}")
            require(
                spec.get("unhealthyPodEvictionPolicy") == "AlwaysAllow",
                f"{describe(budget)}: not-ready followers would hold a drain back",
            )
        if component == "etcd":
            members = etcd["replicas"]
            down = spec.get("maxUnavailable")
            require(
                isinstance(down, int) and members - down >= members // 2 + 1,
                f"{describe(budget)}: maxUnavailable {down} of {members} members loses quorum",
            )
    return ", ".join(f"{c}: maxUnavailable {b['spec'].get('maxUnavailable')}" for c, b in sorted(budgets.items())) or "none"


def check_high_availability(manifests: list[dict[str, Any]], merged: dict[str, Any]) -> str:
    """The coordinator's state: sled (one coordinator, none of the etcd keys)
    or etcd (its endpoints, prefix, lease, TLS files, advertised address),
    and the chart's own etcd when deployed: members clustered by their stable
    DNS names, probes on its plaintext metrics port, TLS with client
    certificates when asked, reachable only by the coordinators."""
    files = config_files(manifests)
    coordinator_values, etcd_values = merged["coordinator"], merged["etcd"]
    deploy = etcd_values["deploy"]
    statefulset = one(manifests, "StatefulSet", "coordinator")
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    where = f"{describe(statefulset)} container {container['name']}"
    config = container_config(statefulset, container, files)
    env = env_of(container)
    etcd_keys = {k for k in config if k.startswith("etcd_")} | ({"leader_lease"} & set(config))
    etcd_workloads = [w for kind in WORKLOAD_KINDS for w in by_kind(manifests, kind) if component_of(w) == "etcd"]
    if coordinator_values["state"] != "etcd":
        require(config.get("state", "sled") == "sled", f"{where}: state {config.get('state')!r} with state sled")
        require(not etcd_keys, f"{where}: etcd keys {sorted(etcd_keys)} with state sled")
        require("FABRIC_COORDINATOR_ADVERTISE_ADDRESS" not in env, f"{where}: an advertised address with state sled")
        require(not etcd_workloads, "the chart's etcd rendered with state sled")
        return "state sled, one coordinator, no etcd"

    require(config.get("state") == "etcd", f"{where}: state {config.get('state')!r}, values say etcd")
    require(config.get("etcd_prefix") == etcd_values["prefix"], f"{where}: etcd_prefix {config.get('etcd_prefix')!r}")
    require(
        config.get("leader_lease") == coordinator_values["leaderLease"],
        f"{where}: leader_lease {config.get('leader_lease')!r}",
    )
    # The address followers name in their fabric-leader hint: this pod's IP.
    scheme = "http" if merged["insecure"]["plaintext"] else "https"
    names = list(env)
    require(
        env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP",
        f"{where}: POD_IP is not the pod's IP",
    )
    advertise = env.get("FABRIC_COORDINATOR_ADVERTISE_ADDRESS", {}).get("value")
    expected_advertise = f"{scheme}://$(POD_IP):{BINARY_PORTS['/usr/local/bin/fabric-coordinator']}"
    require(advertise == expected_advertise, f"{where}: advertised address {advertise!r}, expected {expected_advertise!r}")
    require(
        names.index("POD_IP") < names.index("FABRIC_COORDINATOR_ADVERTISE_ADDRESS"),
        f"{where}: POD_IP must be defined before it is referenced",
    )

    etcd_scheme = "https" if etcd_values["tls"]["enabled"] else "http"
    endpoints = config.get("etcd_endpoints", [])
    require(bool(endpoints), f"{where}: no etcd_endpoints")
    require(
        all(e.startswith(f"{etcd_scheme}://") for e in endpoints),
        f"{where}: etcd_endpoints {endpoints}, expected {etcd_scheme}://",
    )
    tls_keys = {"etcd_tls_ca": "ca.crt", "etcd_tls_cert": "tls.crt", "etcd_tls_key": "tls.key"}
    client_secret = etcd_values["tls"].get("clientSecret") or f"{RELEASE_NAME}-fabric-etcd-client-tls"
    if etcd_values["tls"]["enabled"]:
        for key, file_key in tls_keys.items():
            require(key in config, f"{where}: no {key} with etcd.tls.enabled")
            secret, found = mounted_secret_file(statefulset, container, config[key], f"{where} {key}")
            require(
                (secret, found) == (client_secret, file_key),
                f"{where}: {key} is {found} of Secret {secret}, expected {file_key} of {client_secret}",
            )
    else:
        require(not set(tls_keys) & set(config), f"{where}: etcd TLS files without etcd.tls.enabled")

    if not deploy["enabled"]:
        require(endpoints == etcd_values["endpoints"], f"{where}: etcd_endpoints {endpoints}, values say {etcd_values['endpoints']}")
        require(not etcd_workloads, "the chart's etcd rendered with etcd.endpoints")
        require(
            not [m for m in manifests if component_of(m) == "etcd"], "etcd objects rendered for an existing etcd"
        )
        return f"state etcd, {coordinator_values['replicas']} coordinators, existing etcd ({len(endpoints)} endpoints, {etcd_scheme})"

    # The chart's etcd.
    etcd = one(manifests, "StatefulSet", "etcd")
    name = etcd["metadata"]["name"]
    members = deploy["replicas"]
    require(etcd["spec"]["replicas"] == members, f"{describe(etcd)}: {etcd['spec']['replicas']} members, values say {members}")
    require(etcd["spec"].get("podManagementPolicy") == "Parallel", f"{describe(etcd)}: members not started at once")
    headless = one_service(manifests, "etcd", headless=True)
    require(
        [s for s in by_kind(manifests, "Service") if component_of(s) == "etcd"] == [headless],
        "etcd: a Service other than its headless one",
    )
    require(etcd["spec"]["serviceName"] == headless["metadata"]["name"], f"{describe(etcd)}: serviceName is not its headless Service")
    require(headless["spec"].get("publishNotReadyAddresses") is True, f"{describe(headless)}: members cannot find each other before quorum")
    domain = f"{headless['metadata']['name']}.{NAMESPACE}.svc.{merged['clusterDomain']}"
    pod = etcd["spec"]["template"]["spec"]
    member = pod["containers"][0]
    where = f"{describe(etcd)} container {member['name']}"
    image = member["image"]
    repository, _, tag = image.rpartition(":")
    require(
        repository == deploy["image"]["repository"] and tag == deploy["image"]["tag"] and tag not in ("", "latest"),
        f"{where}: image {image} is not the pinned {deploy['image']['repository']}:{deploy['image']['tag']}",
    )
    flags = flag_values(command_of(member))
    require(
        env_of(member).get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
        f"{where}: POD_NAME is not the pod's name",
    )
    require(flags.get("--name") == "$(POD_NAME)", f"{where}: --name {flags.get('--name')}")
    client, peer, health = deploy["clientPort"], deploy["peerPort"], deploy["metricsPort"]
    cluster = [f"{name}-{i}={etcd_scheme}://{name}-{i}.{domain}:{peer}" for i in range(members)]
    require(
        flags.get("--initial-cluster", "").split(",") == cluster,
        f"{where}: --initial-cluster {flags.get('--initial-cluster')}, expected {','.join(cluster)}",
    )
    for flag, wanted in (
        ("--initial-advertise-peer-urls", f"{etcd_scheme}://$(POD_NAME).{domain}:{peer}"),
        ("--advertise-client-urls", f"{etcd_scheme}://$(POD_NAME).{domain}:{client}"),
        ("--listen-client-urls", f"{etcd_scheme}://0.0.0.0:{client}"),
        ("--listen-peer-urls", f"{etcd_scheme}://0.0.0.0:{peer}"),
        ("--listen-metrics-urls", f"http://0.0.0.0:{health}"),
        ("--initial-cluster-state", "new"),
    ):
        require(flags.get(flag) == wanted, f"{where}: {flag} {flags.get(flag)}, expected {wanted}")
    wanted_endpoints = [f"{etcd_scheme}://{name}-{i}.{domain}:{client}" for i in range(members)]
    require(endpoints == wanted_endpoints, f"coordinator etcd_endpoints {endpoints}, the members are {wanted_endpoints}")
    # The data directory is on the member's own claim.
    claims = etcd["spec"].get("volumeClaimTemplates", [])
    require(
        len(claims) == 1 and claims[0]["metadata"]["name"] == "data"
        and claims[0]["spec"]["resources"]["requests"]["storage"] == deploy["persistence"]["size"],
        f"{describe(etcd)}: expected one claim `data` of {deploy['persistence']['size']}",
    )
    mounts = {m["name"]: m["mountPath"].rstrip("/") for m in member["volumeMounts"]}
    require(
        flags.get("--data-dir", "").startswith(mounts.get("data", "?") + "/"),
        f"{where}: --data-dir {flags.get('--data-dir')} is not on the claim ({mounts.get('data')})",
    )
    # Probes: HTTP on the plaintext metrics port, never the client port.
    ports = {p["name"]: p["containerPort"] for p in member["ports"]}
    require(ports == {"client": client, "peer": peer, "health": health}, f"{where}: ports {ports}")
    for probe_name, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        probe = member.get(probe_name, {}).get("httpGet", {})
        require(
            probe.get("path") == path and probe.get("port") in ("health", health),
            f"{where}: {probe_name} {member.get(probe_name)}, expected GET {path} on the health port",
        )
    # TLS: clients and peers need a certificate of etcd's CA.
    server_secret = etcd_values["tls"].get("serverSecret") or f"{name}-tls"
    tls_flags = ("--cert-file", "--key-file", "--trusted-ca-file", "--peer-cert-file", "--peer-key-file", "--peer-trusted-ca-file")
    if etcd_values["tls"]["enabled"]:
        require(
            "--client-cert-auth" in flags and "--peer-client-cert-auth" in flags,
            f"{where}: TLS without client certificate authentication",
        )
        for flag in tls_flags:
            require(flag in flags, f"{where}: no {flag}")
            secret, _ = mounted_secret_file(etcd, member, flags[flag], f"{where} {flag}")
            require(secret == server_secret, f"{where}: {flag} from Secret {secret}, expected {server_secret}")
    else:
        present = [f for f in tls_flags + ("--client-cert-auth", "--peer-client-cert-auth") if f in flags]
        require(not present, f"{where}: {present} without etcd.tls.enabled")

    # Only the coordinators reach the client port, only members the peer
    # port, nobody the metrics port; whatever networkPolicy.enabled says.
    policies = [p for p in by_kind(manifests, "NetworkPolicy") if component_of(p) == "etcd"]
    require(len(policies) == 1, f"{len(policies)} NetworkPolicies guard the chart's etcd, expected one")
    policy = policies[0]["spec"]
    require(
        pod_components(manifests, policy["podSelector"]["matchLabels"]) == {"etcd"},
        f"{describe(policies[0])}: applies to {sorted(pod_components(manifests, policy['podSelector']['matchLabels']))}",
    )
    require(policy.get("policyTypes") == ["Ingress"], f"{describe(policies[0])}: policyTypes {policy.get('policyTypes')}")
    admitted: dict[int, set[str]] = {}
    for rule in policy.get("ingress", []):
        sources = rule.get("from", [])
        require(bool(sources), f"{describe(policies[0])}: a rule admits every source")
        for source in sources:
            require(
                set(source) == {"podSelector"},
                f"{describe(policies[0])}: admits {sorted(source)}, only this release's pods may be admitted",
            )
        require(bool(rule.get("ports")), f"{describe(policies[0])}: a rule admits every port")
        for port in rule["ports"]:
            for source in sources:
                admitted.setdefault(port["port"], set()).update(
                    pod_components(manifests, source["podSelector"].get("matchLabels", {}))
                )
    require(
        admitted == {client: {"coordinator"}, peer: {"etcd"}},
        f"{describe(policies[0])}: admits {admitted}, expected the coordinators on {client} and members on {peer}",
    )
    return (
        f"state etcd, {coordinator_values['replicas']} coordinators, the chart's etcd: {members} "
        f"member{'s' if members > 1 else ''} "
        f"({etcd_scheme}), clustered by DNS, guarded by a NetworkPolicy"
    )


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
    protected = {component_of(p) for p in policies}
    # The chart's etcd is guarded whatever networkPolicy.enabled says.
    guarded = {"etcd"} if merged["etcd"]["deploy"]["enabled"] else set()
    if merged["networkPolicy"]["enabled"]:
        servers = {component_of(w) for kind in WORKLOAD_KINDS for w in by_kind(manifests, kind)}
        require(
            protected == servers, f"NetworkPolicies cover {sorted(protected)}, servers are {sorted(servers)}"
        )
    else:
        require(
            protected == guarded,
            f"NetworkPolicies cover {sorted(protected)} while networkPolicy.enabled is false, expected {sorted(guarded)}",
        )
    require(
        "port-forward" in notes and "fabricctl" in notes,
        "NOTES.txt does not say how to reach the coordinator with fabricctl",
    )
    coordinator = merged["coordinator"]
    if coordinator["state"] == "etcd":
        require("High availability" in notes, "NOTES.txt does not say how the coordinators fail over")
        if coordinator["readiness"] == "leader" and coordinator["replicas"] > 1:
            require(
                "OnDelete" in notes and "delete pod" in notes,
                "NOTES.txt does not say how to roll the coordinators out (updateStrategy OnDelete)",
            )
        if merged["etcd"]["deploy"]["enabled"]:
            require("NetworkPolicy" in notes, "NOTES.txt does not say that only the coordinators reach etcd")
    else:
        require("High availability" not in notes, "NOTES.txt speaks of high availability with state sled")
    if merged["insecure"]["plaintext"]:
        require("WARNING" in notes, "NOTES.txt does not warn about insecure.plaintext")
    else:
        require("FABRIC_TLS_CA" in notes, "NOTES.txt does not say how fabricctl gets the fabric's CA")
    if merged["agent"]["enabled"]:
        # The host decides which commands jobs may run: exactly what values say.
        agent = config_files(manifests)[(f"{RELEASE_NAME}-fabric-config", "agent.toml")]
        require(
            agent.get("allow_commands") == merged["agent"]["allowCommands"],
            f"agent.toml allow_commands {agent.get('allow_commands')}, values say {merged['agent']['allowCommands']}",
        )
        require(
            agent.get("hooks", {}) == merged["agent"]["hooks"],
            f"agent.toml hooks {agent.get('hooks')}, values say {merged['agent']['hooks']}",
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


def documented_metrics(readme: Path) -> set[str]:
    """The metric names README's Metrics section lists (what the binaries serve)."""
    text = readme.read_text(encoding="utf-8")
    start = text.index("### Metrics")
    end = text.index("\n## ", start)
    names = set(re.findall(r"`(fabric_[a-z_]+)`", text[start:end]))
    require(bool(names), f"{readme}: no metric names in its Metrics section")
    return names


def metric_names_in(expression: str) -> set[str]:
    """The fabric_* metric names an expression uses, histogram and counter
    suffixes taken off where the documented name lacks them."""
    return set(re.findall(r"\b(fabric_[a-z_]+)", expression))


def known_metric(name: str, documented: set[str]) -> bool:
    if name in documented:
        return True
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix) and name[: -len(suffix)] in documented:
            return True
    return False


def check_monitoring(manifests: list[dict[str, Any]], merged: dict[str, Any], readme: Path) -> str:
    """Metrics ports in the Services, ServiceMonitors on them, alerts and the
    dashboard on metrics the binaries serve."""
    metrics = merged["metrics"]
    documented = documented_metrics(readme)
    services = {s["metadata"]["name"]: s for s in by_kind(manifests, "Service")}
    for component in ("coordinator", "storage"):
        exposing = [
            s for s in services.values()
            if component_of(s) == component and any(p["name"] == "metrics" for p in s["spec"]["ports"])
        ]
        if metrics["enabled"]:
            require(len(exposing) == 1, f"{component}: {len(exposing)} Services expose a metrics port, expected one")
            port = next(p for p in exposing[0]["spec"]["ports"] if p["name"] == "metrics")
            require(
                port["port"] == merged[component]["metricsPort"] and port["targetPort"] == "metrics",
                f"{describe(exposing[0])}: metrics port {port} is not {component}.metricsPort",
            )
        else:
            require(not exposing, f"{component}: metrics are disabled but a Service exposes a metrics port")
    monitors = by_kind(manifests, "ServiceMonitor")
    wanted = metrics["enabled"] and metrics["serviceMonitor"]["enabled"]
    require(len(monitors) == (2 if wanted else 0), f"{len(monitors)} ServiceMonitors, expected {2 if wanted else 0}")
    scheme = "http" if merged["insecure"]["plaintext"] else "https"
    for monitor in monitors:
        component = component_of(monitor)
        selected = [
            s for s in services.values()
            if all(s["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
        ]
        for endpoint in monitor["spec"]["endpoints"]:
            require(
                any(p["name"] == endpoint["port"] for s in selected for p in s["spec"]["ports"]),
                f"{describe(monitor)}: no selected Service has port {endpoint['port']}",
            )
            require(endpoint["scheme"] == scheme, f"{describe(monitor)}: scheme {endpoint['scheme']}, expected {scheme}")
            require(endpoint["path"] == "/metrics", f"{describe(monitor)}: path {endpoint['path']}")
            if "authorization" in endpoint:
                require(
                    component == "coordinator",
                    f"{describe(monitor)}: a bearer token for {component}, which takes certificates only",
                )
    rules = by_kind(manifests, "PrometheusRule")
    wanted = metrics["enabled"] and metrics["prometheusRule"]["enabled"]
    require(len(rules) == (1 if wanted else 0), f"{len(rules)} PrometheusRules, expected {1 if wanted else 0}")
    alerts = 0
    for rule in rules:
        names = set()
        for group in rule["spec"]["groups"]:
            for entry in group["rules"]:
                names.add(entry.get("alert"))
                unknown = [n for n in metric_names_in(entry["expr"]) if not known_metric(n, documented)]
                require(not unknown, f"alert {entry.get('alert')}: {unknown} are not metrics the fabric serves")
                alerts += 1
        require(EXPECTED_ALERTS <= names, f"{describe(rule)}: missing alerts {sorted(EXPECTED_ALERTS - names)}")
    dashboards = [c for c in by_kind(manifests, "ConfigMap") if "fabric.json" in c.get("data", {})]
    wanted = metrics["enabled"] and metrics["grafanaDashboard"]["enabled"]
    require(len(dashboards) == (1 if wanted else 0), f"{len(dashboards)} dashboards, expected {1 if wanted else 0}")
    panels = 0
    for configmap in dashboards:
        dashboard = json.loads(configmap["data"]["fabric.json"])
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                unknown = [n for n in metric_names_in(target["expr"]) if not known_metric(n, documented)]
                require(not unknown, f"dashboard panel {panel['title']!r}: {unknown} are not metrics the fabric serves")
            panels += 1
    return f"{len(monitors)} ServiceMonitors, {alerts} alerts, {panels} dashboard panels"


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
        f"{label}: gRPC probes on the plaintext health ports, coordinator address", lambda: check_servers(manifests, merged)
    )
    report.check(f"{label}: TLS files or insecure plaintext", lambda: check_transport(manifests, merged))
    report.check(
        f"{label}: cert-manager Certificates, one identity per pod", lambda: check_certificates(manifests, merged)
    )
    report.check(f"{label}: StatefulSets, claims, node ids", lambda: check_statefulsets(manifests, merged))
    report.check(f"{label}: security contexts", lambda: check_security(manifests, merged))
    report.check(
        f"{label}: coordinator state, etcd, leader address", lambda: check_high_availability(manifests, merged)
    )
    report.check(f"{label}: PodDisruptionBudgets", lambda: check_disruption_budgets(manifests, merged))
    report.check(
        f"{label}: optional parts, NOTES.txt", lambda: check_shape(manifests, merged, state["notes"])
    )
    readme = chart_dir.parent.parent / "README.md"
    report.check(
        f"{label}: metrics ports, ServiceMonitors, alerts, dashboard",
        lambda: check_monitoring(manifests, merged, readme),
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


def expect_render_refused(chart: helm.Chart, values: dict[str, Any], mentions: list[str]) -> str:
    chart.validate_schema(values)
    try:
        chart.render(values, name=RELEASE_NAME, namespace=NAMESPACE, is_install=True)
    except helm.HelmError as error:
        message = str(error)
        missing = [word for word in mentions if word not in message]
        require(not missing, f"the render error does not name {missing}: {message}")
        return "schema accepts, render refuses"
    raise CheckFailed(f"the chart rendered {values}")


def expect_refused_without_schema(chart_dir: Path, values: dict[str, Any], mentions: list[str]) -> str:
    """The templates' own `fail`: render a copy of the chart without its
    values.schema.json (the chart itself is left alone)."""
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / chart_dir.name
        shutil.copytree(chart_dir, copy)
        (copy / "values.schema.json").unlink()
        bare = helm.Chart.load(copy)
        try:
            bare.render(values, name=RELEASE_NAME, namespace=NAMESPACE, is_install=True)
        except helm.HelmError as error:
            message = str(error)
            missing = [word for word in mentions if word not in message]
            require(not missing, f"the render error does not name {missing}: {message}")
            return "a template fails the render"
    raise CheckFailed(f"the chart without its schema rendered {values}")


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

    # Mode B: cert-manager issues every identity.
    cert_manager_file = helm_dir / "ci" / "values-cert-manager.yaml"
    check_rendering(report, chart, chart_dir, cert_manager_file.name, load_values_file(cert_manager_file))

    # The agent as a plain non-root user, and the other switches turned off.
    check_rendering(report, chart, chart_dir, "small variant", SMALL_VARIANT)

    # Mode C: no TLS at all.
    check_rendering(report, chart, chart_dir, "insecure plaintext", INSECURE_VARIANT)

    # Prometheus Operator objects and the dashboard.
    check_rendering(report, chart, chart_dir, "monitoring", MONITORING_VARIANT)

    # High availability: several coordinators with their state in etcd, the
    # chart's own (three members; one over TLS) or an existing one over TLS.
    for name in ("values-etcd.yaml", "values-etcd-external.yaml"):
        path = helm_dir / "ci" / name
        check_rendering(report, chart, chart_dir, path.name, load_values_file(path))
    check_rendering(report, chart, chart_dir, "etcd small variant", ETCD_SMALL_VARIANT)

    bad_file = helm_dir / "ci" / "values-bad.yaml"
    report.check(
        f"{bad_file.name} is rejected by the schema",
        lambda: expect_rejected(chart, load_values_file(bad_file), ["replicas", "size", "port", "issuerRef"]),
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
        "cert-manager without an issuer": ({"tls": {"certManager": {"enabled": True}}}, ["issuerRef", "name"]),
        "cert-manager with insecure plaintext": (
            {"insecure": {"plaintext": True}, "tls": {"certManager": {"enabled": True, "issuerRef": {"name": "ca"}}}},
            ["certManager"],
        ),
        "an unknown issuer kind": (
            {"tls": {"certManager": {"enabled": True, "issuerRef": {"name": "ca", "kind": "Isuer"}}}},
            ["kind"],
        ),
        "agents reading Secrets of no listed node": (
            {"agent": {"enabled": True}, "tls": {"agent": {"source": "secrets"}}},
            ["nodes"],
        ),
        "an unknown agent certificate source": ({"tls": {"agent": {"source": "csi"}}}, ["source"]),
        "a TLS switch that does not exist": ({"tls": {"enabled": False}}, ["enabled"]),
        "insecure plaintext as a string": ({"insecure": {"plaintext": "yes"}}, ["plaintext"]),
        "a health port out of range": ({"storage": {"healthPort": 0}}, ["healthPort"]),
        "a metrics port out of range": ({"coordinator": {"metricsPort": 70000}}, ["metricsPort"]),
        "a misspelt monitoring switch": ({"metrics": {"serviceMonitors": {"enabled": True}}}, ["serviceMonitors"]),
        "a blank allowed command": ({"agent": {"allowCommands": [" "]}}, ["allowCommands"]),
        "a hook name with a space": ({"agent": {"hooks": {"db freeze": "/bin/true"}}}, ["db freeze"]),
        "two coordinators with state sled": ({"coordinator": {"replicas": 2}}, ["replicas"]),
        "an unknown coordinator state": ({"coordinator": {"state": "raft"}}, ["state"]),
        "state etcd with no etcd": ({"coordinator": {"state": "etcd", "replicas": 3}}, ["etcd"]),
        "state etcd with both an existing etcd and the chart's": (
            {
                "coordinator": {"state": "etcd"},
                "etcd": {"endpoints": ["http://etcd:2379"], "deploy": {"enabled": True}},
            },
            ["etcd"],
        ),
        "the chart's etcd with state sled": ({"etcd": {"deploy": {"enabled": True}}}, ["etcd"]),
        "an etcd of two members": (
            {"coordinator": {"state": "etcd"}, "etcd": {"deploy": {"enabled": True, "replicas": 2}}},
            ["replicas"],
        ),
        "an etcd image tagged latest": (
            {"coordinator": {"state": "etcd"}, "etcd": {"deploy": {"enabled": True, "image": {"tag": "latest"}}}},
            ["tag"],
        ),
        "plaintext etcd endpoints with etcd TLS": (
            {"coordinator": {"state": "etcd"}, "etcd": {"endpoints": ["http://etcd:2379"], "tls": {"enabled": True}}},
            ["endpoints"],
        ),
        "an etcd endpoint with no scheme": (
            {"coordinator": {"state": "etcd"}, "etcd": {"endpoints": ["etcd:2379"]}},
            ["endpoints"],
        ),
        "an unknown readiness": ({"coordinator": {"readiness": "always"}}, ["readiness"]),
    }
    for label, (values, mentions) in bad_cases.items():
        report.check(
            f"schema rejects {label}",
            lambda values=values, mentions=mentions: expect_rejected(chart, values, mentions),
        )

    # The schema cannot compare two values: the templates refuse this one.
    report.check(
        "render refuses a health port equal to the TLS port",
        lambda: expect_render_refused(chart, {"agent": {"enabled": True, "healthPort": 7401}}, ["agent.healthPort"]),
    )

    report.check(
        "render refuses a metrics port equal to the health port",
        lambda: expect_render_refused(chart, {"storage": {"metricsPort": 7421}}, ["storage.metricsPort"]),
    )

    # The same rules in the templates, for a render that skips the schema.
    template_cases = {
        "two coordinators with state sled": ({"coordinator": {"replicas": 2}}, ["coordinator.replicas", "etcd"]),
        "state etcd with no etcd": (
            {"coordinator": {"state": "etcd", "replicas": 3}},
            ["etcd.endpoints", "etcd.deploy.enabled"],
        ),
        "state etcd with both etcds": (
            {"coordinator": {"state": "etcd"}, "etcd": {"endpoints": ["http://etcd:2379"], "deploy": {"enabled": True}}},
            ["both"],
        ),
        "the chart's etcd with state sled": ({"etcd": {"deploy": {"enabled": True}}}, ["coordinator.state"]),
        "etcd ports that collide": (
            {"coordinator": {"state": "etcd"}, "etcd": {"deploy": {"enabled": True, "peerPort": 2379}}},
            ["etcd.deploy.clientPort"],
        ),
    }
    for label, (values, mentions) in template_cases.items():
        report.check(
            f"render without the schema refuses {label}",
            lambda values=values, mentions=mentions: expect_refused_without_schema(chart_dir, values, mentions),
        )

    status = report.summary()
    print(f"chart check took {time.monotonic() - started:.1f}s")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
