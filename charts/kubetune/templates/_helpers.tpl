{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped name for the objects this chart owns. */}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "kubetune.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "kubetune.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The app.kubernetes.io labels every object of the release carries. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end -}}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kubetune.operatorLabels" -}}
{{ include "kubetune.labels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetune.operatorSelectorLabels" -}}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.workerServiceAccountName" -}}
{{- if .Values.workers.serviceAccount.create -}}
{{- default (printf "%s-worker" (include "kubetune.fullname" .)) .Values.workers.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.workers.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kubetune.workerImage" -}}
{{- if .Values.workers.image.repository -}}
{{- printf "%s:%s" .Values.workers.image.repository (default .Chart.AppVersion .Values.workers.image.tag) -}}
{{- else -}}
{{- include "kubetune.image" . -}}
{{- end -}}
{{- end -}}

{{/* The Secret (in each job's namespace) the operator hands to workers when a job names
     none: the admin's own (external.secretName), or one the operator writes per namespace. */}}
{{- define "kubetune.storageSecretName" -}}
{{- if and .Values.postgresql.external.secretName (not .Values.postgresql.external.adminSecretName) -}}
{{- .Values.postgresql.external.secretName -}}
{{- else -}}
{{- printf "%s-storage" (include "kubetune.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.storageSecretKey" -}}
{{- if and .Values.postgresql.external.secretName (not .Values.postgresql.external.adminSecretName) -}}
{{- .Values.postgresql.external.secretKey -}}
{{- else -}}
url
{{- end -}}
{{- end -}}

{{/* Whether the chart runs the bundled PostgreSQL ("true" or ""). */}}
{{- define "kubetune.bundledPostgresql" -}}
{{- if and .Values.postgresql.bundled.enabled (not .Values.postgresql.external.secretName) (not .Values.postgresql.external.adminSecretName) -}}
true
{{- end -}}
{{- end -}}

{{/* The Secret in the release namespace holding the admin URL the operator makes each
     namespace's database and role with; empty when the admin gives per-namespace Secrets. */}}
{{- define "kubetune.adminStorageSecretName" -}}
{{- if .Values.postgresql.external.adminSecretName -}}
{{- .Values.postgresql.external.adminSecretName -}}
{{- else if include "kubetune.bundledPostgresql" . -}}
{{- .Values.postgresql.bundled.existingSecret | default (include "kubetune.postgresqlName" .) -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.adminStorageSecretKey" -}}
{{- if .Values.postgresql.external.adminSecretName -}}
{{- .Values.postgresql.external.adminSecretKey -}}
{{- else -}}
url
{{- end -}}
{{- end -}}

{{- define "kubetune.postgresqlName" -}}
{{- printf "%s-postgresql" (include "kubetune.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Namespaces whose TuningJobs the operator serves; empty means all. */}}
{{- /* Where a user's first job may go: never the release namespace, where jobs are refused. */}}
{{- define "kubetune.jobNamespaces" -}}
{{- if .Values.operator.watchNamespaces -}}
{{- join "," (without .Values.operator.watchNamespaces .Release.Namespace) | default "ml" -}}
{{- else -}}
ml
{{- end -}}
{{- end -}}

{{/* Hardening shared by the operator container and what the operator tells workers to use. */}}
{{- define "kubetune.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "kubetune.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}
