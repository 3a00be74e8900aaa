{{- define "moeserve.name" -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "moeserve.labels" -}}
app.kubernetes.io/name: moeserve
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "moeserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Pods of one group: ep / gpusPerNode (the chart fails when it does not divide). */}}
{{- define "moeserve.groupSize" -}}
{{- $pool := index .root.Values .role -}}
{{- if not .root.Values.gpu -}}1
{{- else if ne (mod (int $pool.ep) (int $pool.gpusPerNode)) 0 -}}
{{- fail (printf "%s.ep (%d) must be a multiple of %s.gpusPerNode (%d)" .role (int $pool.ep) .role (int $pool.gpusPerNode)) -}}
{{- else -}}{{ div (int $pool.ep) (int $pool.gpusPerNode) }}
{{- end -}}
{{- end -}}

{{/* The worker's command line, one argument per line, for the role's engine. */}}
{{- define "moeserve.workerArgs" -}}
{{- $pool := index .root.Values .role -}}
{{- $nodes := int (include "moeserve.groupSize" .) -}}
{{- $model := .root.Values.model.path -}}
{{- if eq $pool.engine "sglang" }}
- python3
- -m
- sglang.launch_server
- --model-path={{ $model }}
- --host=0.0.0.0
- --port={{ $pool.port }}
- --grpc-mode
- --disaggregation-mode={{ .role }}
- --disaggregation-transfer-backend=mooncake
{{- if eq .role "prefill" }}
- --disaggregation-bootstrap-port={{ $pool.bootstrapPort }}
{{- end }}
{{- if $pool.ibDevices }}
- --disaggregation-ib-device={{ $pool.ibDevices }}
{{- end }}
- --tp-size={{ $pool.ep }}
- --dp-size={{ $pool.ep }}
- --enable-dp-attention
- --moe-a2a-backend=deepep
- --deepep-mode={{ $pool.deepepMode }}
{{- if $pool.eplb.enabled }}
- --enable-eplb
- --ep-num-redundant-experts={{ $pool.eplb.redundantExperts }}
{{- end }}
- --trust-remote-code
{{- if gt $nodes 1 }}
- --nnodes={{ $nodes }}
- --node-rank=$(LWS_WORKER_INDEX)
- --dist-init-addr=$(LWS_LEADER_ADDRESS):{{ $pool.distPort }}
{{- end }}
{{- else }}
- moeserve
- worker
- --role={{ .role }}
- --model={{ $model }}
- --host=0.0.0.0
- --advertise-host=$(POD_IP)
- --port={{ $pool.port }}
- --ep={{ $pool.ep }}
- --dispatcher={{ $pool.dispatcher }}
- --deepep-mode={{ $pool.deepepMode }}
{{- if $pool.metricsPort }}
- --metrics-port={{ $pool.metricsPort }}
{{- end }}
{{- if .root.Values.gpu }}
- --device=cuda
{{- if $pool.ibDevices }}
- --transfer-protocol=rdma
- --transfer-device={{ $pool.ibDevices }}
{{- end }}
{{- end }}
{{- if gt $nodes 1 }}
- --nnodes={{ $nodes }}
- --node-rank=$(LWS_WORKER_INDEX)
- --dist-init-addr=$(LWS_LEADER_ADDRESS):{{ $pool.distPort }}
{{- end }}
{{- end }}
{{- range $pool.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}
