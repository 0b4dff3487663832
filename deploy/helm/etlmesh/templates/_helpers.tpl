{{/* The release's base name. */}}
{{- define "etlmesh.fullname" -}}
{{- printf "%s-etlmesh" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "etlmesh.labels" -}}
app.kubernetes.io/name: etlmesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The control plane's URL inside the cluster. */}}
{{- define "etlmesh.controlPlaneUrl" -}}
{{- printf "http://%s-control-plane:%v" (include "etlmesh.fullname" .) .Values.controlPlane.port -}}
{{- end -}}

{{/* The image. */}}
{{- define "etlmesh.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}
