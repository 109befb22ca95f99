{{/*
The chart's name: the app.kubernetes.io/name label of every object.
*/}}
{{- define "kapsa.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name. With the release name `kapsa` (the
documented install) it is `kapsa`, so the objects are named as in deploy/.
*/}}
{{- define "kapsa.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A name made of the prefix and a suffix, e.g. `kapsa-operator`.
*/}}
{{- define "kapsa.suffixed" -}}
{{- printf "%s-%s" (include "kapsa.fullname" .root) .suffix | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The operator's ServiceAccount.
*/}}
{{- define "kapsa.serviceAccountName" -}}
{{- default (include "kapsa.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{/*
The user name the API server gives the operator's ServiceAccount: the
admission policies match on it.
*/}}
{{- define "kapsa.operatorUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "kapsa.serviceAccountName" .) }}
{{- end }}

{{/*
Selects the operator's pods: the Deployment's selector, the Service's, the
PodDisruptionBudget's and the ServiceMonitor's. The same labels as deploy/
(no release label: the selector of a Deployment cannot change later).
*/}}
{{- define "kapsa.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kapsa.name" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Helm's own labels, on top of those of deploy/.
*/}}
{{- define "kapsa.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The labels of the operator's objects.
*/}}
{{- define "kapsa.labels" -}}
{{ include "kapsa.selectorLabels" . }}
{{ include "kapsa.helmLabels" . }}
{{- end }}

{{/*
The image reference: a digest wins over a tag; the tag defaults to the
chart's appVersion.
*/}}
{{- define "kapsa.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}
