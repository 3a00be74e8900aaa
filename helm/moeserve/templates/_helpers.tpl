{{/* The release's name, the prefix of every object; the same string as the
     `app.kubernetes.io/instance` label the orchestrator selects pods by. Every generated name
     must fit 63 characters: a LeaderWorkerSet's worker StatefulSet `{name}-decode-{group}` gets
     pods labelled `controller-revision-hash: {statefulset}-{10-character hash}`. */}}
{{- define "moeserve.name" -}}
{{- if gt (len .Release.Name) 40 -}}
{{- fail (printf "release name %q is %d characters; at most 40 fit every generated name" .Release.Name (len .Release.Name)) -}}
{{- end -}}
{{- if ne .Values.prefill.engine .Values.decode.engine -}}
{{- fail (printf "prefill.engine (%s) and decode.engine (%s) differ: a decode worker fetches KV only from a prefill of its own engine (moeserve's hand-off or SGLang's bootstrap server)" .Values.prefill.engine .Values.decode.engine) -}}
{{- end -}}
{{- .Release.Name -}}
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

{{/* The worker's command line, one argument per line, for the role's engine; `leader`: the pod
     of node rank 0 (SGLang: only it runs the gRPC front; the other nodes run plain
     `sglang.launch_server`, which starts their scheduler ranks and nothing else). */}}
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
{{- if .leader }}
- --grpc-mode
{{- end }}
- --disaggregation-mode={{ .role }}
- --disaggregation-transfer-backend=mooncake
{{- if eq .role "prefill" }}
- --disaggregation-bootstrap-port={{ $pool.bootstrapPort }}
{{- /* Under attention DP the gRPC servicer deals requests to the DP ranks itself (no DP
     controller): a prefill must register each room's rank for decode to ask, not demand
     room % ranks (SGLang's PD-prefill default, follow_bootstrap_room, refuses the others). */}}
- --load-balance-method=round_robin
{{- /* SGLang 0.5.23's server args are frozen before the servicer could turn the publisher on by
     default: name it, a port per DP rank from kvEventsPort (the servicer relays the ranks on its
     own node to the orchestrator's prefix index). */}}
- '--kv-events-config={"publisher":"zmq","endpoint":"tcp://*:{{ $pool.kvEventsPort }}"}'
{{- end }}
{{- if $pool.ibDevices }}
- --disaggregation-ib-device={{ $pool.ibDevices }}
{{- end }}
- --tp-size={{ $pool.ep }}
- --attn-dp-size={{ $pool.ep }}
- --moe-a2a-backend=deepep
- --deepep-mode={{ $pool.deepepMode }}
{{- if $pool.eplb.redundantExperts }}
- --ep-num-redundant-experts={{ $pool.eplb.redundantExperts }}
{{- end }}
{{- if $pool.eplb.placementConfigMap }}
- --init-expert-location=/etc/moeserve/eplb/{{ $pool.eplb.placementKey }}
{{- end }}
{{- if $pool.eplb.enabled }}
- --enable-eplb
{{- end }}
- --enable-metrics
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
