{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "ingest.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or the release name alone when it already contains the chart name. */}}
{{- define "ingest.fullname" -}}
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

{{- define "ingest.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "ingest.labels" -}}
helm.sh/chart: {{ include "ingest.chart" . }}
{{ include "ingest.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: worker
app.kubernetes.io/part-of: ingest
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels: immutable in a Deployment, so nothing that changes between releases. */}}
{{- define "ingest.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ingest.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ingest.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ingest.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ingest.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end }}

{{/* Where things live inside the pod. One place, so the config and the mounts cannot disagree. */}}
{{- define "ingest.configDir" -}}/etc/ingest{{- end }}
{{- define "ingest.configPath" -}}{{ include "ingest.configDir" . }}/config.yaml{{- end }}
{{- define "ingest.secretsDir" -}}/var/run/secrets/ingest{{- end }}

{{- define "ingest.ringcentralSecretName" -}}
{{- .Values.credentials.ringcentral.existingSecret | default (printf "%s-ringcentral" (include "ingest.fullname" .)) }}
{{- end }}
{{- define "ingest.kafkaSaslSecretName" -}}
{{- .Values.credentials.kafka.sasl.existingSecret | default (printf "%s-kafka-sasl" (include "ingest.fullname" .)) }}
{{- end }}
{{- define "ingest.kafkaTlsSecretName" -}}
{{- .Values.credentials.kafka.tls.existingSecret | default (printf "%s-kafka-tls" (include "ingest.fullname" .)) }}
{{- end }}

{{/*
The worker config: `.Values.config` plus what the chart owns (secret file paths, accounts, metrics
port, Kafka security properties). Values in `.Values.config` win over the chart's Kafka defaults,
so that any librdkafka property stays overridable.
*/}}
{{- define "ingest.workerConfig" -}}
{{- $root := . -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $secrets := include "ingest.secretsDir" . -}}
{{- /* Kafka security, derived from credentials.kafka */ -}}
{{- $sasl := .Values.credentials.kafka.sasl -}}
{{- $tls := .Values.credentials.kafka.tls -}}
{{- $kafka := dict -}}
{{- if and $sasl.enabled $tls.enabled }}{{ $_ := set $kafka "security.protocol" "SASL_SSL" }}
{{- else if $sasl.enabled }}{{ $_ := set $kafka "security.protocol" "SASL_PLAINTEXT" }}
{{- else if $tls.enabled }}{{ $_ := set $kafka "security.protocol" "SSL" }}
{{- end -}}
{{- if $sasl.enabled }}{{ $_ := set $kafka "sasl.mechanism" $sasl.mechanism }}{{ end -}}
{{- if $tls.enabled -}}
{{- $_ := set $kafka "ssl.ca.location" (printf "%s/kafka/ca.crt" $secrets) -}}
{{- if $tls.clientCertificate -}}
{{- $_ := set $kafka "ssl.certificate.location" (printf "%s/kafka/tls.crt" $secrets) -}}
{{- $_ := set $kafka "ssl.key.location" (printf "%s/kafka/tls.key" $secrets) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cfg "kafka" (mergeOverwrite $kafka (default dict $cfg.kafka)) -}}
{{- /* RingCentral app secret */ -}}
{{- $rc := default dict $cfg.ringcentral -}}
{{- $_ := set $rc "client_secret_file" (printf "%s/ringcentral/client_secret" $secrets) -}}
{{- $_ := set $cfg "ringcentral" $rc -}}
{{- /* Accounts: jwtSecret is the chart's; everything else goes to the worker as is */ -}}
{{- $accounts := list -}}
{{- range .Values.accounts -}}
{{- $account := omit . "jwtSecret" -}}
{{- $_ := set $account "jwt_file" (printf "%s/accounts/%s/jwt" $secrets .name) -}}
{{- $accounts = append $accounts $account -}}
{{- end -}}
{{- $_ := set $cfg "accounts" $accounts -}}
{{- /* Metrics and health: the probes and the Service point at this port */ -}}
{{- $metrics := default dict $cfg.metrics -}}
{{- $_ := set $metrics "host" "0.0.0.0" -}}
{{- $_ := set $metrics "port" (int .Values.metrics.port) -}}
{{- $_ := set $cfg "metrics" $metrics -}}
{{- /* WebHook: the receiver listens where the container port and the Service point */ -}}
{{- if .Values.webhook.enabled -}}
{{- $webhook := default dict $cfg.webhook -}}
{{- /* The pod sees the whole URL path (no rewrite in the Ingress): a path in publicUrl moves into `path` */ -}}
{{- $url := urlParse .Values.webhook.publicUrl -}}
{{- $_ := set $webhook "public_url" (printf "%s://%s" $url.scheme $url.host) -}}
{{- $_ := set $webhook "path" (include "ingest.webhookPath" .) -}}
{{- $_ := set $webhook "host" "0.0.0.0" -}}
{{- $_ := set $webhook "port" (int .Values.webhook.port) -}}
{{- $_ := set $cfg "webhook" $webhook -}}
{{- $_ := set $cfg "transport" "webhook" -}}
{{- else -}}
{{- $_ := unset $cfg "webhook" -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end }}

{{/* Checks that fail the render with a clear message instead of a pod that cannot start. */}}
{{- define "ingest.validate" -}}
{{- /* The worker's stop (ingest/worker/runtime.py): flush for shutdown_timeout_seconds, then up to
       5 s for the checkpoint thread and 5 s for the last checkpoint's flush, then the subscription
       manager; hence 15 s on top of the flush timeout. */ -}}
{{- $grace := int .Values.terminationGracePeriodSeconds -}}
{{- $flush := dig "worker" "shutdown_timeout_seconds" 10 .Values.config | float64 -}}
{{- if lt (float64 $grace) (addf $flush 15) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least config.worker.shutdown_timeout_seconds + 15 (%v): the worker flushes to Kafka for up to shutdown_timeout_seconds, then writes its last checkpoint; a shorter grace period kills it before that" $grace (addf $flush 15)) -}}
{{- end -}}
{{- $names := dict -}}
{{- range .Values.accounts -}}
{{- if hasKey $names .name -}}
{{- fail (printf "accounts: the name %q appears twice; account names must be unique" .name) -}}
{{- end -}}
{{- $_ := set $names .name true -}}
{{- end -}}
{{- range $key, $_ := .Values.config.kafka -}}
{{- if regexMatch "password|secret|ssl\\.key\\.pem|sasl\\.jaas\\.config|oauthbearer\\.config" $key -}}
{{- fail (printf "config.kafka.%s: a credential does not belong in the ConfigMap; use credentials.kafka, or extraEnv with valueFrom.secretKeyRef (INGEST__KAFKA__...)" $key) -}}
{{- end -}}
{{- end -}}
{{- $coordination := dig "worker" "coordination" "standalone" .Values.config -}}
{{- if and (ne $coordination "group") (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) -}}
{{- fail "config.worker.coordination must be \"group\" with more than one pod (replicaCount > 1 or autoscaling): standalone pods would each own every spec" -}}
{{- end -}}
{{- if .Values.webhook.enabled -}}
{{- if not (hasPrefix "https://" .Values.webhook.publicUrl) -}}
{{- fail (printf "webhook.publicUrl: an https URL is required with webhook.enabled (RingCentral POSTs only to https), got %q" .Values.webhook.publicUrl) -}}
{{- end -}}
{{- if eq (int .Values.webhook.port) (int .Values.metrics.port) -}}
{{- fail (printf "webhook.port: must differ from metrics.port (%d)" (int .Values.metrics.port)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.webhook.enabled (gt (int .Values.processes) 1) -}}
{{- fail "processes must be 1 with webhook.enabled: the processes of a pod cannot share the receiver's port (run more pods)" -}}
{{- end -}}
{{- if and (ne $coordination "group") (gt (int .Values.processes) 1) -}}
{{- fail "config.worker.coordination must be \"group\" with more than one process per pod (processes > 1): the processes share the specs through the group" -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) -}}
{{- fail "metrics.serviceMonitor.enabled needs metrics.service.enabled: the ServiceMonitor scrapes through the Service" -}}
{{- end -}}
{{- end }}

{{/* The URL path of the deliveries: the path part of `webhook.publicUrl`, then `webhook.path`. */}}
{{- define "ingest.webhookPath" -}}
{{- printf "%s%s" (trimSuffix "/" (urlParse .Values.webhook.publicUrl).path) .Values.webhook.path }}
{{- end }}
