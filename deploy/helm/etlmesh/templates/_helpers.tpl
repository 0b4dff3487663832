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

{{/* The Secret holding the mesh's trust anchor and join token. */}}
{{- define "etlmesh.meshSecret" -}}
{{- default (printf "%s-mesh" (include "etlmesh.fullname" .)) .Values.mesh.existingSecret -}}
{{- end -}}

{{/* The control plane's address for workers and gateways: its mesh listener
(mTLS) when the mesh is on, else its admin listener. */}}
{{- define "etlmesh.memberUrl" -}}
{{- if .Values.mesh.enabled -}}
{{- printf "https://%s-control-plane:%v" (include "etlmesh.fullname" .) .Values.mesh.port -}}
{{- else -}}
{{- include "etlmesh.controlPlaneUrl" . -}}
{{- end -}}
{{- end -}}

{{/* The join token, for a process joining the mesh. */}}
{{- define "etlmesh.joinTokenEnv" -}}
{{- if .Values.mesh.enabled }}
- name: ETLMESH_JOIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "etlmesh.meshSecret" . }}
      key: join-token
{{- end }}
{{- end -}}

{{/* The object-storage settings as the AWS tools' environment (workers and gateways). */}}
{{- define "etlmesh.objectStorageEnv" -}}
{{- with .Values.objectStorage }}
{{- if .endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ .endpoint | quote }}
{{- end }}
{{- if .region }}
- name: AWS_REGION
  value: {{ .region | quote }}
{{- end }}
{{- if .allowHttp }}
- name: AWS_ALLOW_HTTP
  value: "true"
{{- end }}
{{- if .existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: { name: {{ .existingSecret | quote }}, key: access-key-id }
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: { name: {{ .existingSecret | quote }}, key: secret-access-key }
{{- end }}
{{- end }}
{{- end -}}
