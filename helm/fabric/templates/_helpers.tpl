{{/*
Names, labels and the pieces every fabric workload shares.
*/}}

{{- define "fabric.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name, the prefix of every resource name. Kept to 40
characters so that "<fullname>-coordinator-headless" stays a valid DNS label.
*/}}
{{- define "fabric.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fabric.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fabric.coordinatorName" -}}
{{- printf "%s-coordinator" (include "fabric.fullname" .) }}
{{- end }}

{{/* The headless Service that gives the coordinator pod its network identity. */}}
{{- define "fabric.coordinatorHeadlessName" -}}
{{- printf "%s-coordinator-headless" (include "fabric.fullname" .) }}
{{- end }}

{{/*
The coordinator's readiness probe asks the health of this service: with
state etcd and readiness "leader", fabric.v1.Coordinator (SERVING only on the
leader); otherwise "" (the server, SERVING on every live coordinator; with
state sled the one coordinator is always the leader, and the probe stays as
it was).
*/}}
{{- define "fabric.coordinatorReadinessService" -}}
{{- if and (eq .Values.coordinator.state "etcd") (eq .Values.coordinator.readiness "leader") }}fabric.v1.Coordinator{{ end }}
{{- end }}

{{/*
A pod anti-affinity preset ("soft", "hard", "none"); call with (dict
"context" $ "component" C "mode" MODE). Renders nothing for "none".
*/}}
{{- define "fabric.antiAffinity" -}}
{{- if eq .mode "soft" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "fabric.componentSelectorLabels" . | nindent 12 }}
{{- else if eq .mode "hard" -}}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "fabric.componentSelectorLabels" . | nindent 10 }}
{{- end }}
{{- end }}

{{/* The storage StatefulSet and its headless Service share this name. */}}
{{- define "fabric.storageName" -}}
{{- printf "%s-storage" (include "fabric.fullname" .) }}
{{- end }}

{{- define "fabric.agentName" -}}
{{- printf "%s-agent" (include "fabric.fullname" .) }}
{{- end }}

{{- define "fabric.configName" -}}
{{- printf "%s-config" (include "fabric.fullname" .) }}
{{- end }}

{{- define "fabric.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fabric.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The scheme of every address: https, or http with insecure.plaintext. */}}
{{- define "fabric.scheme" -}}
{{- ternary "http" "https" .Values.insecure.plaintext }}
{{- end }}

{{/* The coordinator's Service address. */}}
{{- define "fabric.coordinatorServiceUrl" -}}
{{- printf "%s://%s.%s.svc.%s:%d" (include "fabric.scheme" .) (include "fabric.coordinatorName" .) .Release.Namespace .Values.clusterDomain (int .Values.coordinator.port) }}
{{- end }}

{{/*
The address nodes and agents dial to reach the coordinator (their
`coordinator` key). One coordinator (state sled): its Service. Several (state
etcd): the Service first, then every coordinator pod's stable DNS name (the
headless Service publishes not-ready pods too), comma-separated. The Service
reaches the leader (readiness "leader") or a live coordinator that names the
leader; the pod names let a node find the new leader at once after a
failover, before the Service's endpoints catch up, and without the Service.
*/}}
{{- define "fabric.coordinatorUrl" -}}
{{- $urls := list (include "fabric.coordinatorServiceUrl" .) }}
{{- if eq .Values.coordinator.state "etcd" }}
{{- $statefulset := include "fabric.coordinatorName" . }}
{{- $headless := include "fabric.coordinatorHeadlessName" . }}
{{- range $i := until (int .Values.coordinator.replicas) }}
{{- $urls = append $urls (printf "%s://%s-%d.%s.%s.svc.%s:%d" (include "fabric.scheme" $) $statefulset $i $headless $.Release.Namespace $.Values.clusterDomain (int $.Values.coordinator.port)) }}
{{- end }}
{{- end }}
{{- join "," $urls }}
{{- end }}

{{/* The chart's etcd: its StatefulSet and headless Service share this name. */}}
{{- define "fabric.etcdName" -}}
{{- printf "%s-etcd" (include "fabric.fullname" .) }}
{{- end }}

{{/* The scheme of etcd's URLs: https with etcd.tls.enabled. */}}
{{- define "fabric.etcdScheme" -}}
{{- ternary "https" "http" .Values.etcd.tls.enabled }}
{{- end }}

{{/* A member of the chart's etcd's stable DNS name; call with (dict "context" $ "pod" POD). */}}
{{- define "fabric.etcdMemberHost" -}}
{{- printf "%s.%s.%s.svc.%s" .pod (include "fabric.etcdName" .context) .context.Release.Namespace .context.Values.clusterDomain }}
{{- end }}

{{/* The etcd client URLs the coordinators dial, as a list. */}}
{{- define "fabric.etcdEndpoints" -}}
{{- if .Values.etcd.deploy.enabled }}
{{- $urls := list }}
{{- $statefulset := include "fabric.etcdName" . }}
{{- range $i := until (int .Values.etcd.deploy.replicas) }}
{{- $urls = append $urls (printf "%s://%s:%d" (include "fabric.etcdScheme" $) (include "fabric.etcdMemberHost" (dict "context" $ "pod" (printf "%s-%d" $statefulset $i))) (int $.Values.etcd.deploy.clientPort)) }}
{{- end }}
{{- toJson $urls }}
{{- else }}
{{- toJson .Values.etcd.endpoints }}
{{- end }}
{{- end }}

{{/* The coordinators' etcd client Secret (tls.crt, tls.key, ca.crt). */}}
{{- define "fabric.etcdClientTlsSecret" -}}
{{- default (printf "%s-client-tls" (include "fabric.etcdName" .)) .Values.etcd.tls.clientSecret }}
{{- end }}

{{/* The chart's etcd members' Secret (tls.crt, tls.key, ca.crt). */}}
{{- define "fabric.etcdServerTlsSecret" -}}
{{- default (printf "%s-tls" (include "fabric.etcdName" .)) .Values.etcd.tls.serverSecret }}
{{- end }}

{{/* Where the coordinators find their etcd client files. */}}
{{- define "fabric.etcdClientTlsDir" -}}
/etc/fabric/etcd-tls
{{- end }}

{{/*
A storage node's id: its pod's stable DNS name (see the headless Service).
Call with (dict "context" $ "pod" "$(POD_NAME)") or a pod's name.
*/}}
{{- define "fabric.storageNodeId" -}}
{{- printf "%s.%s.%s.svc.%s" .pod (include "fabric.storageName" .context) .context.Release.Namespace .context.Values.clusterDomain }}
{{- end }}

{{/* The Secret holding the coordinator's tls.crt, tls.key and ca.crt. */}}
{{- define "fabric.coordinatorTlsSecret" -}}
{{- default (printf "%s-tls" (include "fabric.coordinatorName" .)) .Values.tls.secrets.coordinator }}
{{- end }}

{{/* The storage pod with ordinal N reads the Secret "<this>N". */}}
{{- define "fabric.storageTlsSecretPrefix" -}}
{{- default (printf "%s-tls-" (include "fabric.storageName" .)) .Values.tls.secrets.storagePrefix }}
{{- end }}

{{/* The agent on Kubernetes node X reads the Secret "<this>X" (source "secrets"). */}}
{{- define "fabric.agentTlsSecretPrefix" -}}
{{- default (printf "%s-tls-" (include "fabric.agentName" .)) .Values.tls.secrets.agentPrefix }}
{{- end }}

{{/*
The transport flags of a server: its three TLS files in .dir, or
--insecure-plaintext. Call with (dict "context" $ "dir" "/etc/fabric/tls").
*/}}
{{- define "fabric.transportArgs" -}}
{{- if .context.Values.insecure.plaintext -}}
# No TLS, no authentication (insecure.plaintext).
- --insecure-plaintext
{{- else -}}
- --tls-cert
- {{ printf "%s/tls.crt" .dir }}
- --tls-key
- {{ printf "%s/tls.key" .dir }}
- --tls-ca
- {{ printf "%s/ca.crt" .dir }}
{{- end }}
{{- end }}

{{/* The read-only mount of a server's TLS files; call unless insecure.plaintext. */}}
{{- define "fabric.tlsVolumeMount" -}}
- name: tls
  mountPath: {{ .Values.tls.mountPath }}
  readOnly: true
{{- end }}

{{/*
The TLS files of the storage pods: the Secret of every ordinal, each under a
directory named after its pod, so that one pod template serves every ordinal
(a pod reads $(POD_NAME)/tls.crt). Call unless insecure.plaintext.
*/}}
{{- define "fabric.storageTlsVolume" -}}
{{- $prefix := include "fabric.storageTlsSecretPrefix" . }}
{{- $statefulset := include "fabric.storageName" . -}}
- name: tls
  projected:
    # Readable by the owner and the pod's fsGroup only.
    defaultMode: 0440
    sources:
      {{- range $i := until (int .Values.storage.replicas) }}
      {{- $pod := printf "%s-%d" $statefulset $i }}
      - secret:
          name: {{ printf "%s%d" $prefix $i }}
          items:
            - key: tls.crt
              path: {{ $pod }}/tls.crt
            - key: tls.key
              path: {{ $pod }}/tls.key
            - key: ca.crt
              path: {{ $pod }}/ca.crt
      {{- end }}
{{- end }}

{{/*
The TLS files of the agents: a directory of each Kubernetes node (source
hostPath), or the Secret of every listed node, each under a directory named
after the node (source secrets). Call unless insecure.plaintext.
*/}}
{{- define "fabric.agentTlsVolume" -}}
{{- if eq .Values.tls.agent.source "hostPath" -}}
- name: tls
  hostPath:
    path: {{ .Values.tls.agent.hostPath }}
    type: Directory
{{- else -}}
{{- $prefix := include "fabric.agentTlsSecretPrefix" . -}}
- name: tls
  projected:
    # Readable by the owner and the pod's fsGroup only.
    defaultMode: 0440
    sources:
      {{- range $node := .Values.tls.agent.nodes }}
      # A node without its Secret: its agent finds no files and says so.
      - secret:
          name: {{ printf "%s%s" $prefix $node }}
          optional: true
          items:
            - key: tls.crt
              path: {{ $node }}/tls.crt
            - key: tls.key
              path: {{ $node }}/tls.key
            - key: ca.crt
              path: {{ $node }}/ca.crt
      {{- end }}
{{- end }}
{{- end }}

{{/*
A cert-manager Certificate for one identity. Call with (dict "context" $
"name" NAME "component" COMPONENT "secretName" SECRET "uri" URI).
*/}}
{{- define "fabric.certificate" -}}
{{- $certManager := .context.Values.tls.certManager -}}
apiVersion: cert-manager.io/v1
kind: Certificate
metadata:
  name: {{ .name }}
  namespace: {{ .context.Release.Namespace }}
  labels:
    {{- include "fabric.componentLabels" (dict "context" .context "component" .component) | nindent 4 }}
spec:
  secretName: {{ .secretName }}
  secretTemplate:
    labels:
      {{- include "fabric.componentLabels" (dict "context" .context "component" .component) | nindent 6 }}
  # The identity is the URI; peers check it, not host names.
  uris:
    - {{ .uri }}
  duration: {{ $certManager.duration }}
  renewBefore: {{ $certManager.renewBefore }}
  privateKey:
    algorithm: ECDSA
    size: 256
    encoding: PKCS8
    rotationPolicy: Always
  # Servers serve with it and dial other servers with it.
  usages:
    - digital signature
    - server auth
    - client auth
  issuerRef:
    name: {{ $certManager.issuerRef.name }}
    kind: {{ $certManager.issuerRef.kind }}
    group: {{ $certManager.issuerRef.group }}
{{- end }}

{{/*
Values that the schema cannot compare, and the rules of the coordinator's
state again (the schema says them first; these hold if it is skipped); fails
the render with a reason.
*/}}
{{- define "fabric.validate" -}}
{{- $coordinator := .Values.coordinator }}
{{- $etcd := .Values.etcd }}
{{- if and (gt (int $coordinator.replicas) 1) (ne $coordinator.state "etcd") }}
{{- fail (printf "coordinator.replicas is %d but coordinator.state is %q: more than one coordinator needs state \"etcd\" (sled is one coordinator's own database)" (int $coordinator.replicas) $coordinator.state) }}
{{- end }}
{{- if eq $coordinator.state "etcd" }}
{{- if and (not $etcd.endpoints) (not $etcd.deploy.enabled) }}
{{- fail "coordinator.state is \"etcd\" but there is no etcd: set etcd.endpoints (an existing etcd) or etcd.deploy.enabled (the chart's own)" }}
{{- end }}
{{- if and $etcd.endpoints $etcd.deploy.enabled }}
{{- fail "etcd.endpoints and etcd.deploy.enabled are both set: use an existing etcd or the chart's own, not both" }}
{{- end }}
{{- if $etcd.deploy.enabled }}
{{- $ports := list (int $etcd.deploy.clientPort) (int $etcd.deploy.peerPort) (int $etcd.deploy.metricsPort) }}
{{- if ne (len (uniq $ports)) 3 }}
{{- fail (printf "etcd.deploy.clientPort, peerPort and metricsPort are %v: each must differ" $ports) }}
{{- end }}
{{- end }}
{{- else if or $etcd.endpoints $etcd.deploy.enabled }}
{{- fail "etcd.endpoints or etcd.deploy.enabled is set but coordinator.state is not \"etcd\"" }}
{{- end }}
{{- range $component := list "coordinator" "storage" "agent" }}
{{- $values := index $.Values $component }}
{{- if eq (int $values.port) (int $values.healthPort) }}
{{- fail (printf "%s.port and %s.healthPort are both %d: the plaintext health port must differ from the TLS port" $component $component (int $values.port)) }}
{{- end }}
{{- if and $.Values.metrics.enabled (or (eq (int $values.metricsPort) (int $values.port)) (eq (int $values.metricsPort) (int $values.healthPort))) }}
{{- fail (printf "%s.metricsPort is %d, the same as its port or healthPort: each port of a server must differ" $component (int $values.metricsPort)) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fabric.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "fabric.labels" -}}
helm.sh/chart: {{ include "fabric.chart" . }}
{{ include "fabric.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fabric
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "fabric.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fabric.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of one component. Call with (dict "context" $ "component" "storage").
*/}}
{{- define "fabric.componentLabels" -}}
{{ include "fabric.labels" .context }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "fabric.componentSelectorLabels" -}}
{{ include "fabric.selectorLabels" .context }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The three gRPC health probes of a server whose plaintext health port is
.port (its health_listen: kubelet cannot present a client certificate, so it
never probes the TLS port). Call with (dict "context" $ "port" 7421), and
"readinessService" NAME to make readiness ask the health of service NAME
instead of the whole server's (startup and liveness always ask the server's).
*/}}
{{- define "fabric.probes" -}}
{{- $probes := .context.Values.probes -}}
startupProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: {{ $probes.startup.periodSeconds }}
  timeoutSeconds: {{ $probes.startup.timeoutSeconds }}
  failureThreshold: {{ $probes.startup.failureThreshold }}
readinessProbe:
  grpc:
    port: {{ .port }}
    {{- with .readinessService }}
    service: {{ . }}
    {{- end }}
  periodSeconds: {{ $probes.readiness.periodSeconds }}
  timeoutSeconds: {{ $probes.readiness.timeoutSeconds }}
  failureThreshold: {{ $probes.readiness.failureThreshold }}
livenessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: {{ $probes.liveness.periodSeconds }}
  timeoutSeconds: {{ $probes.liveness.timeoutSeconds }}
  failureThreshold: {{ $probes.liveness.failureThreshold }}
{{- end }}

{{/* Pod-level settings every fabric pod shares. */}}
{{- define "fabric.podCommon" -}}
serviceAccountName: {{ include "fabric.serviceAccountName" . }}
# The binaries never call the Kubernetes API.
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{/* The volume of existingSecret; call only when it is set. */}}
{{- define "fabric.secretVolume" -}}
- name: secrets
  secret:
    secretName: {{ .Values.existingSecret }}
{{- end }}

{{- define "fabric.secretVolumeMount" -}}
- name: secrets
  mountPath: {{ .Values.existingSecretMountPath }}
  readOnly: true
{{- end }}

{{/* A rolling restart when the configuration changes. */}}
{{- define "fabric.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}

{{/*
A server's metrics_listen (TOML string): 0.0.0.0:<port> when metrics are
enabled, "" (no metrics port) otherwise. Takes (dict "context" $ "port" N).
*/}}
{{- define "fabric.metricsListen" -}}
{{- if .context.Values.metrics.enabled -}}
{{ printf "0.0.0.0:%d" (int .port) | toJson }}
{{- else -}}
""
{{- end -}}
{{- end }}

{{/*
The metrics containerPort of a server, when metrics are enabled. Takes
(dict "context" $ "port" N).
*/}}
{{- define "fabric.metricsContainerPort" -}}
{{- if .context.Values.metrics.enabled }}
# GET /metrics (OpenMetrics) with the server's TLS: monitors and operators.
- name: metrics
  containerPort: {{ .port }}
  protocol: TCP
{{- end }}
{{- end }}
