{{/* The release's objects are named after it (fullnameOverride replaces that). */}}
{{- define "redirect.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "redirect.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "redirect.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "redirect.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "redirect.labels" -}}
{{ include "redirect.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Where the Secrets are mounted in the container (the password and TLS file keys point here). */}}
{{- define "redirect.secretsDir" -}}/run/secrets/redirect{{- end -}}

{{/*
One redirect.toml value: TOML and JSON spell strings, booleans, integers and arrays of
strings alike, so toJson writes each (a float that is whole, as YAML numbers arrive, as an
integer).
*/}}
{{- define "redirect.tomlValue" -}}
{{- if kindIs "float64" . -}}
{{- printf "%d" (int64 .) -}}
{{- else -}}
{{- toJson . -}}
{{- end -}}
{{- end -}}

{{/* Settings the chart derives from its other values, refused under config. */}}
{{- define "redirect.ownedKeys" -}}
metrics-addr pin-dir socket journal source-password-file target-password-file etcd fleet fleet-member etcd-user etcd-password-file etcd-ca etcd-cert etcd-key config
{{- end -}}

{{/* Combinations the schema cannot see, refused with what to do instead. */}}
{{- define "redirect.validate" -}}
{{- range $key, $_ := .Values.config -}}
{{- if has $key (splitList " " (include "redirect.ownedKeys" $)) -}}
{{- fail (printf "config.%s is set by the chart: use metrics, hostPaths, databases or fleet instead (values.yaml says which)" $key) -}}
{{- end -}}
{{- end -}}
{{- if and (not .Values.privileged) (not (index .Values.config "no-sysctl")) -}}
{{- fail "privileged: false leaves /proc/sys read-only: set config.no-sysctl: true and the forwarding sysctls on the node (README, Deploying on a real proxy host)" -}}
{{- end -}}
{{- if and (not .Values.privileged) (eq .Values.bpffsMountPropagation "Bidirectional") -}}
{{- fail "bpffsMountPropagation: Bidirectional needs privileged: true (Kubernetes refuses it otherwise); HostToContainer keeps the pins too" -}}
{{- end -}}
{{- if .Values.fleet.enabled -}}
{{- if or (not .Values.fleet.etcd) (not .Values.fleet.name) -}}
{{- fail "fleet.enabled needs fleet.etcd (the endpoints) and fleet.name" -}}
{{- end -}}
{{- if and .Values.fleet.user (not .Values.fleet.passwordSecret) -}}
{{- fail "fleet.user needs fleet.passwordSecret (a Secret with the key etcd-password)" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.metrics.podMonitor.enabled (hasPrefix "127." .Values.metrics.bindAddress) -}}
{{- fail "metrics.podMonitor.enabled needs metrics.bindAddress 0.0.0.0 (Prometheus cannot scrape the node's loopback)" -}}
{{- end -}}
{{- end -}}
