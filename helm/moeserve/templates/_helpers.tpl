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

{{/* The Secret of the API keys (`api-keys`) and the admin token (`admin-token`): the operator's,
     or the one this chart generates (secret.yaml) when none is named. */}}
{{- define "moeserve.secretName" -}}
{{- .Values.orchestrator.secretName | default (printf "%s-keys" (include "moeserve.name" .)) -}}
{{- end -}}

{{/* The workers' shared gRPC token (worker gRPC takes no API key): moeserve workers refuse calls
     without it, and the orchestrator sends it. Optional in a Secret of the operator's own. */}}
{{- define "moeserve.grpcTokenEnv" -}}
- name: MOESERVE_GRPC_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "moeserve.secretName" . }}
      key: grpc-token
      optional: true
{{- end -}}

{{- define "moeserve.labels" -}}
app.kubernetes.io/name: moeserve
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "moeserve.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default (printf "%s%s" .Chart.AppVersion (ternary "" "-cpu" .Values.gpu)) }}
{{- end -}}
{{- end -}}

{{/* Physical expert slots of a role's instance: the routed experts plus the redundant ones,
     which must divide by the EP width (SGLang asserts it at load, moeserve workers refuse). */}}
{{- define "moeserve.slots" -}}
{{- $pool := index .root.Values .role -}}
{{- $slots := add (int .root.Values.model.routedExperts) (int $pool.eplb.redundantExperts) -}}
{{- if ne (mod $slots (int $pool.ep)) 0 -}}
{{- fail (printf "%s: %d routed + %d redundant experts = %d slots do not divide by ep %d (EP144 needs 288 slots for 256 experts: eplb.redundantExperts 32)" .role (int .root.Values.model.routedExperts) (int $pool.eplb.redundantExperts) $slots (int $pool.ep)) -}}
{{- end -}}
{{ $slots }}
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
{{- $slots := int (include "moeserve.slots" .) -}}
{{- $nodes := int (include "moeserve.groupSize" .) -}}
{{- $model := include "moeserve.modelPath" .root -}}
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
- --dist-timeout={{ $pool.distTimeoutS }}
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
- --dist-timeout={{ $pool.distTimeoutS }}
{{- if $pool.eplb.redundantExperts }}
- --ep-slots={{ $slots }}
{{- end }}
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

{{/* Model sources. `moeserve.modelSource`: the source's kind (volume, hf, pvc, tiny);
     `moeserve.modelPath`: the model directory inside the pods. */}}
{{- define "moeserve.modelSource" -}}
{{- $src := .Values.model.source -}}
{{- if not $src }}volume{{ else }}{{ index (splitList "://" $src) 0 }}{{ end -}}
{{- end -}}

{{- define "moeserve.modelPath" -}}
{{- $kind := include "moeserve.modelSource" . -}}
{{- $rest := index (splitList "://" (.Values.model.source | default "x://x")) 1 -}}
{{- $mount := .Values.model.volume.mountPath -}}
{{- if eq $kind "volume" -}}{{ .Values.model.path }}
{{- else if eq $kind "hf" -}}{{ $mount }}/{{ base (index (splitList "@" $rest) 0) }}
{{- else if eq $kind "pvc" -}}{{ $mount }}/{{ trimPrefix "/" (join "/" (rest (splitList "/" $rest))) }}
{{- else -}}{{ $mount }}/tiny-{{ $rest }}
{{- end -}}
{{- end -}}

{{/* The `models` volume of a pod; `tokenizer`: the orchestrator's (an hf:// model's tokenizer
     files go to a volume of its own, not the workers'). */}}
{{- define "moeserve.modelVolume" -}}
{{- $v := .root.Values -}}
{{- $kind := include "moeserve.modelSource" .root -}}
- name: models
{{- if or (eq $kind "tiny") (and .tokenizer (eq $kind "hf")) }}
  emptyDir: {}
{{- else if eq $kind "pvc" }}
  persistentVolumeClaim:
    claimName: {{ index (splitList "/" (index (splitList "://" $v.model.source) 1)) 0 }}
    readOnly: true
{{- else if eq $v.model.volume.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ $v.model.volume.claimName }}
    readOnly: {{ ne $kind "hf" }}
{{- else }}
  hostPath:
    path: {{ $v.model.volume.hostPath }}
    type: {{ if eq $kind "hf" }}DirectoryOrCreate{{ else }}Directory{{ end }}
{{- end }}
{{- end -}}

{{/* A worker container's securityContext (and its init container's): the pool's own, else for
     GPUs root with only IPC_LOCK (RDMA registers memory beyond any memlock limit) and
     SYS_RESOURCE (a non-root user never holds them); on CPUs uid 10001; both drop ALL. */}}
{{- define "moeserve.workerSecurity" -}}
{{- $pool := index .root.Values .role -}}
{{- if $pool.securityContext -}}
{{ toYaml $pool.securityContext }}
{{- else if $pool.infiniband -}}
# /dev/infiniband from the host: without a device plugin, only a privileged container may open
# its uverbs devices (the namespace must admit privileged pods)
runAsUser: 0
privileged: true
{{- else if .root.Values.gpu -}}
runAsUser: 0
runAsNonRoot: false
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
  add: [IPC_LOCK, SYS_RESOURCE]
seccompProfile:
  type: RuntimeDefault
{{- else -}}
runAsUser: 10001
runAsNonRoot: true
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
{{- end -}}

{{/* The init container that puts the model in place (hf://, tiny://), or nothing; `tokenizer`:
     the orchestrator's, which fetches only the tokenizer and config files into its own volume.
     The download holds a lock on the volume, so the pods sharing it download once, and marks
     the directory complete with its revision. Arguments go as argv, never through a shell. */}}
{{- define "moeserve.modelInit" -}}
{{- $kind := include "moeserve.modelSource" .root -}}
{{- $v := .root.Values -}}
{{- if or (eq $kind "hf") (eq $kind "tiny") }}
- name: model
  image: {{ .image | default (include "moeserve.image" .root) }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if eq $kind "hf" }}
  # The model volume may be a root-owned host path or PVC: the download runs as root with only
  # what writing it takes, then hands the files to the worker's user (`owner`).
  securityContext:
    runAsUser: 0
    runAsNonRoot: false
    allowPrivilegeEscalation: false
    capabilities:
      drop: [ALL]
      add: [CHOWN, DAC_OVERRIDE, FOWNER]
    seccompProfile:
      type: RuntimeDefault
  {{- else }}
  {{- with .securityContext }}
  securityContext:
    {{- . | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- if eq $kind "tiny" }}
  command: [moeserve, make-tiny-model, {{ include "moeserve.modelPath" .root | quote }}, --arch, {{ index (splitList "://" $v.model.source) 1 | quote }}]
  {{- else }}
  {{- $repo := index (splitList "://" $v.model.source) 1 }}
  command:
    - python3
    - -c
    - |
      import fcntl, os, sys
      from huggingface_hub import snapshot_download
      repo, revision, dest, only_tokenizer, owner = sys.argv[1], sys.argv[2] or None, sys.argv[3], sys.argv[4] == "1", int(sys.argv[5])
      os.makedirs(dest, exist_ok=True)
      done = os.path.join(dest, ".moeserve-complete")
      with open(dest.rstrip("/") + ".lock", "w") as lock:
          fcntl.flock(lock, fcntl.LOCK_EX)  # one download per volume; the others wait, then skip
          if only_tokenizer or not os.path.exists(done) or open(done).read() != repr((repo, revision)):
              patterns = ["*.json", "*.model", "*.tiktoken", "*.txt", "*.py", "*.jinja"] if only_tokenizer else None
              snapshot_download(repo, revision=revision, local_dir=dest, allow_patterns=patterns)
              if not only_tokenizer:
                  open(done, "w").write(repr((repo, revision)))
          for root, dirs, files in os.walk(dest):  # the worker's user reads (and may refresh) them
              for name in [root, *(os.path.join(root, f) for f in dirs + files)]:
                  os.chown(name, owner, owner)
    - {{ index (splitList "@" $repo) 0 | quote }}
    - {{ if contains "@" $repo }}{{ index (splitList "@" $repo) 1 | quote }}{{ else }}""{{ end }}
    - {{ include "moeserve.modelPath" .root | quote }}
    - {{ if .tokenizer }}"1"{{ else }}"0"{{ end }}
    - {{ if hasKey . "owner" }}{{ .owner | quote }}{{ else }}"10001"{{ end }}
  {{- with $v.model.hfTokenSecret }}
  env:
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: token
  {{- end }}
  {{- end }}
  volumeMounts:
    - name: models
      mountPath: {{ $v.model.volume.mountPath }}
{{- end }}
{{- end -}}
