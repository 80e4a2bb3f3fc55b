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
  ceil(config.shutdown.drain) + terminationGraceMarginSeconds + preStopSleepSeconds.
fanout's own default drain is 30s when config.shutdown.drain is null.
*/}}
{{- define "fanout.terminationGracePeriodSeconds" -}}
{{- $explicit := index .Values "terminationGracePeriodSeconds" }}
{{- if not (kindIs "invalid" $explicit) }}
{{- $explicit | int64 }}
{{- else }}
{{- $drain := include "fanout.durationSeconds" (list "config.shutdown.drain" (dig "shutdown" "drain" "30s" .Values.config | default "30s")) | int64 }}
{{- add $drain (.Values.terminationGraceMarginSeconds | int64) (.Values.preStopSleepSeconds | int64) }}
{{- end }}
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
{{- if regexMatch "^[a-z+]+://[^/@:]*:[^/@]*@" $url }}
{{- fail (printf "config.%s.url holds a password and would be stored in a ConfigMap: put the URL in a Secret and reference it with %s.name/key" $section $ref) }}
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
