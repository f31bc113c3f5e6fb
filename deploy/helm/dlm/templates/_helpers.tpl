{{/* Names and labels, as `helm create` writes them. */}}
{{- define "dlm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dlm.fullname" -}}
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

{{- define "dlm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dlm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dlm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dlm.labels" -}}
helm.sh/chart: {{ include "dlm.chart" . }}
{{ include "dlm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Per component: the Triton replicas and the gateway. */}}
{{- define "dlm.triton.name" -}}
{{- printf "%s-triton" (include "dlm.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dlm.triton.selectorLabels" -}}
{{ include "dlm.selectorLabels" . }}
app.kubernetes.io/component: triton
{{- end }}

{{- define "dlm.gateway.name" -}}
{{- printf "%s-gateway" (include "dlm.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dlm.gateway.selectorLabels" -}}
{{ include "dlm.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "dlm.router.name" -}}
{{- printf "%s-router" (include "dlm.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dlm.router.selectorLabels" -}}
{{ include "dlm.selectorLabels" . }}
app.kubernetes.io/component: router
{{- end }}

{{/* The InferencePool's name: the release's (the router is started with --pool-name of it). */}}
{{- define "dlm.pool.name" -}}
{{- include "dlm.fullname" . }}
{{- end }}

{{/* The engine type the replicas' pods are labelled with (llm-d.ai/engine-type) and the router's engineConfigs
   name: the gauges' names of client/replica_gauges.py. */}}
{{- define "dlm.engineType" -}}
dlm
{{- end }}

{{- define "dlm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dlm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secrets that hold the keys: the user's own, or the chart's. */}}
{{- define "dlm.adminKeySecret" -}}
{{- default (printf "%s-admin-key" (include "dlm.fullname" .)) .Values.triton.adminKey.existingSecret }}
{{- end }}

{{- define "dlm.apiKeySecret" -}}
{{- default (printf "%s-gateway-api-key" (include "dlm.fullname" .)) .Values.gateway.apiKey.existingSecret }}
{{- end }}

{{/* A random key for a Secret the chart creates, kept across upgrades (lookup finds the one installed). */}}
{{- define "dlm.secretValue" -}}
{{- $secret := lookup "v1" "Secret" .namespace .name }}
{{- if and $secret $secret.data (hasKey $secret.data .key) }}
{{- index $secret.data .key }}
{{- else }}
{{- randAlphaNum 40 | b64enc }}
{{- end }}
{{- end }}


{{/* Where Triton reads the model repository. */}}
{{- define "dlm.modelRepository" -}}
{{- $repo := .Values.modelRepository }}
{{- if eq $repo.source "pvc" }}
{{- if .Values.triton.modelConfig.generate }}/models{{ else }}/mnt/repository{{ end }}
{{- else if eq $repo.source "s3" }}
{{- if not (hasPrefix "s3://" $repo.s3.uri) }}
{{- fail (printf "modelRepository.s3.uri must be an s3:// URI (modelRepository.source is s3), got %q" $repo.s3.uri) }}
{{- end }}
{{- $repo.s3.uri }}
{{- else if eq $repo.source "gcs" }}
{{- if not (hasPrefix "gs://" $repo.gcs.uri) }}
{{- fail (printf "modelRepository.gcs.uri must be a gs:// URI (modelRepository.source is gcs), got %q" $repo.gcs.uri) }}
{{- end }}
{{- $repo.gcs.uri }}
{{- else }}
{{- fail (printf "modelRepository.source must be pvc, s3 or gcs, got %q" $repo.source) }}
{{- end }}
{{- end }}

{{/* The restricted-API setting, with the key from the environment (Kubernetes expands $(VAR) in args). */}}
{{- define "dlm.restricted" -}}
{{- printf "%s:admin-key=$(DLM_ADMIN_KEY)" (join "," .Values.triton.restrictedApis) }}
{{- end }}

{{- define "dlm.autoscalingBehavior" -}}
scaleUp:
  stabilizationWindowSeconds: {{ .Values.autoscaling.scaleUpStabilizationSeconds }}
  policies:
    - type: Pods
      value: {{ .Values.autoscaling.scaleUpPodsPerMinute }}
      periodSeconds: 60
scaleDown:
  stabilizationWindowSeconds: {{ .Values.autoscaling.scaleDownStabilizationSeconds }}
  policies:
    - type: Pods
      value: {{ .Values.autoscaling.scaleDownPodsPerMinute }}
      periodSeconds: 60
{{- end }}

{{/* An image reference: repository@digest when a digest is given, else repository:tag. */}}
{{- define "dlm.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (.image.tag | default .default) }}
{{- end }}
{{- end }}
