{{/*
Names and labels.
*/}}
{{- define "fanout.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fanout.fullname" -}}
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

{{/* The admin Service's name; also the Prometheus `job` label the ServiceMonitor gives. */}}
{{- define "fanout.adminName" -}}
{{- printf "%s-admin" (include "fanout.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "fanout.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fanout.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fanout.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fanout.labels" -}}
helm.sh/chart: {{ include "fanout.chart" . }}
{{ include "fanout.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fanout
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "fanout.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fanout.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "fanout.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}
{{- end }}

{{/*
The port of a listen address "ip:port" (the part after the last ":"), as an integer.
Fails on anything else, naming the key. Argument: (list "config.server.listen" $value).
*/}}
{{- define "fanout.portOf" -}}
{{- $key := index . 0 }}
{{- $addr := index . 1 | toString }}
{{- if not (regexMatch "^.+:[0-9]{1,5}$" $addr) }}
{{- fail (printf "%s must be an address ip:port, got %q" $key $addr) }}
{{- end }}
{{- regexFind "[0-9]+$" $addr }}
{{- end }}

{{- define "fanout.publicPort" -}}
{{- include "fanout.portOf" (list "config.server.listen" (dig "server" "listen" "0.0.0.0:8080" .Values.config)) }}
{{- end }}

{{- define "fanout.adminPort" -}}
{{- include "fanout.portOf" (list "config.admin.listen" (dig "admin" "listen" "0.0.0.0:9090" .Values.config)) }}
{{- end }}

{{/*
A fanout duration ("30s", "500ms", "1m 30s", "2h") in whole seconds, rounded up.
Units as humantime parses them: ms/msec, s/sec/second(s), m/min/minute(s),
h/hr/hour(s), d/day(s), w/week(s). Fails on anything else.
Argument: (list "config.shutdown.drain" $value).
*/}}
{{- define "fanout.durationSeconds" -}}
{{- $key := index . 0 }}
{{- $s := index . 1 | toString | trim }}
{{- $piece := "[0-9]+[ ]*[a-zA-Z]+" }}
{{- if or (eq $s "") (ne (regexReplaceAll $piece $s "" | trim) "") }}
{{- fail (printf "%s: cannot parse the duration %q (expected e.g. \"30s\", \"500ms\", \"1m 30s\")" $key $s) }}
{{- end }}
{{- $ms := 0 }}
{{- range regexFindAll $piece $s -1 }}
{{- $n := regexFind "^[0-9]+" . | atoi }}
{{- $unit := regexReplaceAll "^[0-9]+[ ]*" . "" }}
{{- if has $unit (list "ms" "msec" "msecs") }}
{{- $ms = add $ms $n }}
{{- else if has $unit (list "s" "sec" "secs" "second" "seconds") }}
{{- $ms = add $ms (mul $n 1000) }}
{{- else if has $unit (list "m" "min" "mins" "minute" "minutes") }}
{{- $ms = add $ms (mul $n 60000) }}
{{- else if has $unit (list "h" "hr" "hrs" "hour" "hours") }}
{{- $ms = add $ms (mul $n 3600000) }}
{{- else if has $unit (list "d" "day" "days") }}
{{- $ms = add $ms (mul $n 86400000) }}
{{- else if has $unit (list "w" "week" "weeks") }}
{{- $ms = add $ms (mul $n 604800000) }}
{{- else }}
{{- fail (printf "%s: unknown unit %q in the duration %q" $key $unit $s) }}
{{- end }}
{{- end }}
{{- div (add $ms 999) 1000 }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the explicit value, or
  ceil(config.shutdown.drain) + ceil(config.shutdown.grace) + terminationGraceMarginSeconds
  + preStopSleepSeconds.
fanout's own defaults are drain 30s and grace 10s when the values are null.
*/}}
{{- define "fanout.terminationGracePeriodSeconds" -}}
{{- $explicit := index .Values "terminationGracePeriodSeconds" }}
{{- if not (kindIs "invalid" $explicit) }}
{{- $explicit | int64 }}
{{- else }}
{{- include "fanout.shutdownBudgetSeconds" . | int64 | add (.Values.terminationGraceMarginSeconds | int64) (.Values.preStopSleepSeconds | int64) }}
{{- end }}
{{- end }}

{{/*
ceil(config.shutdown.drain) + ceil(config.shutdown.grace): the longest fanout takes to exit
after SIGTERM.
*/}}
{{- define "fanout.shutdownBudgetSeconds" -}}
{{- $drain := include "fanout.durationSeconds" (list "config.shutdown.drain" (dig "shutdown" "drain" "30s" .Values.config | default "30s")) | int64 }}
{{- $grace := include "fanout.durationSeconds" (list "config.shutdown.grace" (dig "shutdown" "grace" "10s" .Values.config | default "10s")) | int64 }}
{{- add $drain $grace }}
{{- end }}

{{/*
TOML rendering of the `config` values.
fanout.toml.value: one scalar or a list of scalars. Strings are JSON-escaped, which is
a valid TOML basic string; whole numbers print without a fraction.
*/}}
{{- define "fanout.toml.value" -}}
{{- $v := . }}
{{- if kindIs "string" $v }}
{{- toJson $v }}
{{- else if kindIs "bool" $v }}
{{- $v }}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) }}
{{- if eq (floor $v) ($v | float64) }}{{ $v | int64 }}{{ else }}{{ $v }}{{ end }}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) (kindIs "int32" $v) (kindIs "uint64" $v) }}
{{- $v }}
{{- else if kindIs "slice" $v }}
{{- $items := list }}
{{- range $v }}
{{- if or (kindIs "map" .) (kindIs "slice" .) (kindIs "invalid" .) }}
{{- fail (printf "config: lists may only hold strings, numbers or booleans, got %v" $v) }}
{{- end }}
{{- $items = append $items (include "fanout.toml.value" .) }}
{{- end }}
{{- printf "[%s]" (join ", " $items) }}
{{- else }}
{{- fail (printf "config: cannot render %v (%s) as TOML" $v (kindOf $v)) }}
{{- end }}
{{- end }}

{{/*
fanout.toml.section: "[name]" with its scalar keys (null ones left out), then one
"[name.key]" sub-table per map value, its keys quoted (librdkafka names contain dots).
Argument: (list "kafka" $table).
*/}}
{{- define "fanout.toml.section" -}}
{{- $name := index . 0 }}
{{- $table := index . 1 | default dict }}
{{- printf "[%s]" $name }}
{{- range $k, $v := $table }}
{{- if not (or (kindIs "map" $v) (kindIs "invalid" $v)) }}
{{ printf "%s = %s" $k (include "fanout.toml.value" $v) }}
{{- end }}
{{- end }}
{{- range $k, $v := $table }}
{{- if and (kindIs "map" $v) $v }}

{{ printf "[%s.%s]" $name $k }}
{{- range $kk, $vv := $v }}
{{- if not (kindIs "invalid" $vv) }}
{{ printf "%s = %s" (toJson (toString $kk)) (include "fanout.toml.value" $vv) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Refuses secrets in the ConfigMap: auth.jwt_secret, auth.admin_token and URLs with a
password belong in `secrets`.
*/}}
{{- define "fanout.checkNoSecrets" -}}
{{- $auth := .Values.config.auth | default dict }}
{{- range $key, $ref := dict "jwt_secret" "secrets.jwtSecret" "admin_token" "secrets.adminToken" }}
{{- if index $auth $key }}
{{- fail (printf "config.auth.%s is a secret and would be stored in a ConfigMap: put it in a Secret and reference it with %s.name/key" $key $ref) }}
{{- end }}
{{- end }}
{{- range $section, $ref := dict "redis" "secrets.redisUrl" "database" "secrets.databaseUrl" }}
{{- $url := dig $section "url" "" ($.Values.config | default dict) | default "" | toString }}
{{- if regexMatch "^[a-z+-]+://[^/@:]*:[^/@]*@" $url }}
{{- fail (printf "config.%s.url holds a password and would be stored in a ConfigMap: put the URL in a Secret and reference it with %s.name/key" $section $ref) }}
{{- end }}
{{- end }}
{{- $kafka := dig "kafka" dict (.Values.config | default dict) | default dict }}
{{- range $key, $ref := dict "sasl_password" "secrets.kafkaSaslPassword" "ssl_key_password" "secrets.kafkaSslKeyPassword" }}
{{- if index $kafka $key }}
{{- fail (printf "config.kafka.%s is a secret and would be stored in a ConfigMap: put it in a Secret and reference it with %s.name/key" $key $ref) }}
{{- end }}
{{- end }}
{{- /* librdkafka properties the typed kafka.* keys own: fanout refuses them in kafka.options (exit 2). */}}
{{- $owned := dict
    "bootstrap.servers" "config.kafka.brokers"
    "security.protocol" "config.kafka.security_protocol"
    "sasl.mechanism" "config.kafka.sasl_mechanism"
    "sasl.mechanisms" "config.kafka.sasl_mechanism"
    "sasl.username" "config.kafka.sasl_username (or secrets.kafkaSaslUsername)"
    "sasl.password" "secrets.kafkaSaslPassword"
    "sasl.oauthbearer.method" "config.kafka.sasl_mechanism (OAUTHBEARER)"
    "sasl.oauthbearer.client.id" "config.kafka.sasl_username"
    "sasl.oauthbearer.client.secret" "secrets.kafkaSaslPassword"
    "sasl.oauthbearer.token.endpoint.url" "config.kafka.sasl_oauthbearer_token_endpoint_url"
    "sasl.oauthbearer.scope" "config.kafka.sasl_oauthbearer_scope"
    "ssl.ca.location" "tls.kafka.ca (or config.kafka.ssl_ca_location)"
    "ssl.certificate.location" "tls.kafka.clientCert (or config.kafka.ssl_certificate_location)"
    "ssl.key.location" "tls.kafka.clientCert (or config.kafka.ssl_key_location)"
    "ssl.key.password" "secrets.kafkaSslKeyPassword" }}
{{- range $prop, $v := (index $kafka "options" | default dict) }}
{{- if hasKey $owned $prop }}
{{- fail (printf "config.kafka.options.%s: fanout sets this itself and refuses it in kafka.options; use %s" $prop (index $owned $prop)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The TLS files of `tls`: one entry per mounted file, as a YAML list of
{service, what, source ("secret"/"configMap"), name, key, path (under /etc/fanout), mode}.
Fails on inconsistent entries.
*/}}
{{- define "fanout.tlsFiles" -}}
{{- $files := list }}
{{- $tls := .Values.tls | default dict }}
{{- range $service := list "kafka" "redis" "database" }}
{{- $t := index $tls $service | default dict }}
{{- $ca := index $t "ca" | default dict }}
{{- if and $ca.secretName $ca.configMapName }}
{{- fail (printf "tls.%s.ca: set secretName or configMapName, not both" $service) }}
{{- end }}
{{- if or $ca.secretName $ca.configMapName }}
{{- $key := required (printf "tls.%s.ca.key is required when tls.%s.ca is set" $service $service) $ca.key }}
{{- $files = append $files (dict "service" $service "what" "ca" "source" (ternary "secret" "configMap" (not (empty $ca.secretName))) "name" (default $ca.configMapName $ca.secretName) "key" $key "path" (printf "%s/ca.pem" $service) "mode" 292) }}
{{- end }}
{{- $cc := index $t "clientCert" | default dict }}
{{- if $cc.secretName }}
{{- $files = append $files (dict "service" $service "what" "cert" "source" "secret" "name" $cc.secretName "key" (required (printf "tls.%s.clientCert.certKey is required" $service) $cc.certKey) "path" (printf "%s/client.pem" $service) "mode" 292) }}
{{- $files = append $files (dict "service" $service "what" "key" "source" "secret" "name" $cc.secretName "key" (required (printf "tls.%s.clientCert.keyKey is required" $service) $cc.keyKey) "path" (printf "%s/client.key" $service) "mode" 288) }}
{{- end }}
{{- end }}
{{- toYaml (dict "files" $files) }}
{{- end }}

{{/*
fanout.tlsConfig (list $ $config): fills the Kafka and Redis path keys of $config (a copy
of .Values.config) with the mounted files of `tls`, where config names no path itself, and
checks that the TLS settings fit together (the node would refuse them at start, exit 2).
*/}}
{{- define "fanout.tlsConfig" -}}
{{- $ := index . 0 }}
{{- $config := index . 1 }}
{{- $files := (include "fanout.tlsFiles" $ | fromYaml).files | default list }}
{{- $keys := dict
    "kafka" (dict "ca" "ssl_ca_location" "cert" "ssl_certificate_location" "key" "ssl_key_location")
    "redis" (dict "ca" "tls_ca_file" "cert" "tls_cert_file" "key" "tls_key_file") }}
{{- $used := dict }}
{{- range $f := $files }}
{{- $_ := set $used $f.service true }}
{{- if hasKey $keys $f.service }}
{{- if not (hasKey $config $f.service) }}{{ $_ := set $config $f.service dict }}{{ end }}
{{- $section := index $config $f.service | default dict }}
{{- $_ := set $config $f.service $section }}
{{- $key := index (index $keys $f.service) $f.what }}
{{- if not (index $section $key) }}
{{- $_ := set $section $key (printf "/etc/fanout/%s" $f.path) }}
{{- end }}
{{- end }}
{{- end }}
{{- $kafka := index $config "kafka" | default dict }}
{{- $protocol := index $kafka "security_protocol" | default "plaintext" | toString | lower }}
{{- if and (index $used "kafka") (not (has $protocol (list "ssl" "sasl_ssl"))) }}
{{- fail (printf "tls.kafka is set, but config.kafka.security_protocol is %q: set ssl or sasl_ssl (fanout refuses TLS files it would not use)" $protocol) }}
{{- end }}
{{- if and $.Values.secrets.kafkaSaslPassword.name (not (has $protocol (list "sasl_plaintext" "sasl_ssl"))) }}
{{- fail (printf "secrets.kafkaSaslPassword is set, but config.kafka.security_protocol is %q: set sasl_ssl (or sasl_plaintext) and config.kafka.sasl_mechanism" $protocol) }}
{{- end }}
{{- if and $.Values.secrets.kafkaSslKeyPassword.name (not (index $kafka "ssl_key_location")) }}
{{- fail "secrets.kafkaSslKeyPassword is set, but there is no client key: set tls.kafka.clientCert" }}
{{- end }}
{{- $redisUrl := dig "redis" "url" "" $config | default "" | toString }}
{{- if and (index $used "redis") (not $.Values.secrets.redisUrl.name) (not (hasPrefix "rediss" $redisUrl)) }}
{{- fail (printf "tls.redis is set, but config.redis.url %q is not rediss:// (or rediss-sentinel://) and secrets.redisUrl is not set" $redisUrl) }}
{{- end }}
{{- $dbUrl := dig "database" "url" "" $config | default "" | toString }}
{{- if and $dbUrl (not $.Values.secrets.databaseUrl.name) }}
{{- range $f := $files }}
{{- if eq $f.service "database" }}
{{- $param := index (dict "ca" "sslrootcert" "cert" "sslcert" "key" "sslkey") $f.what }}
{{- if not (contains (printf "%s=/etc/fanout/%s" $param $f.path) $dbUrl) }}
{{- fail (printf "tls.database mounts /etc/fanout/%s, but config.database.url does not name it: add %s=/etc/fanout/%s" $f.path $param $f.path) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Label matchers selecting this release's fanout series in alerts.
*/}}
{{- define "fanout.metricSelector" -}}
{{- if .Values.prometheusRule.selector }}
{{- .Values.prometheusRule.selector }}
{{- else }}
{{- printf "namespace=%q, job=%q" .Release.Namespace (include "fanout.adminName" .) }}
{{- end }}
{{- end }}
