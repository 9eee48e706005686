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

{{/* The address nodes and agents dial to reach the coordinator. */}}
{{- define "fabric.coordinatorUrl" -}}
{{- printf "http://%s.%s.svc.%s:%d" (include "fabric.coordinatorName" .) .Release.Namespace .Values.clusterDomain (int .Values.coordinator.port) }}
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
The three gRPC health probes of a server listening on .port. Call with
(dict "context" $ "port" 7401).
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
