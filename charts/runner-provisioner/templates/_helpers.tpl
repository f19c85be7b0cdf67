{{/*
Names, labels and the RunnerPool rendering helpers.
*/}}

{{- define "runner-provisioner.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "runner-provisioner.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "runner-provisioner.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "runner-provisioner.selectorLabels" -}}
app.kubernetes.io/name: {{ include "runner-provisioner.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "runner-provisioner.labels" -}}
helm.sh/chart: {{ include "runner-provisioner.chart" . }}
{{ include "runner-provisioner.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels of objects rendered from `pools` (no selector labels: they are not the operator). */}}
{{- define "runner-provisioner.poolLabels" -}}
helm.sh/chart: {{ include "runner-provisioner.chart" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: {{ include "runner-provisioner.name" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "runner-provisioner.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "runner-provisioner.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "runner-provisioner.leaseName" -}}
{{- default (include "runner-provisioner.fullname" .) .Values.leaderElection.leaseName -}}
{{- end -}}

{{- define "runner-provisioner.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{/* Namespace of the RunnerPools and token Secrets rendered from `pools`. */}}
{{- define "runner-provisioner.poolsNamespace" -}}
{{- if and .Values.watchNamespace .Values.poolsNamespace (ne .Values.watchNamespace .Values.poolsNamespace) -}}
{{- fail (printf "poolsNamespace (%s) must equal watchNamespace (%s): the operator only sees RunnerPools in the watched namespace" .Values.poolsNamespace .Values.watchNamespace) -}}
{{- end -}}
{{- .Values.poolsNamespace | default .Values.watchNamespace | default .Release.Namespace -}}
{{- end -}}

{{/* Name of the Secret holding the CircleCI API token. */}}
{{- define "runner-provisioner.apiSecretName" -}}
{{- if .Values.existingSecret -}}
{{- .Values.existingSecret -}}
{{- else -}}
{{- printf "%s-circleci-api" .Release.Name -}}
{{- end -}}
{{- end -}}

{{/*
The operator's command line (shared by the Deployment and its checksum).
*/}}
{{- define "runner-provisioner.args" -}}
- run
- --log-format={{ .Values.logFormat }}
- --ready-addr=0.0.0.0:8000
- --live-addr=0.0.0.0:8001
- --circleci-timeout={{ .Values.circleciTimeout }}
- --concurrency={{ .Values.concurrency }}
{{- with .Values.watchNamespace }}
- --namespace={{ . }}
{{- end }}
{{- if .Values.leaderElection.enabled }}
- --leader-election=true
- --lease-name={{ include "runner-provisioner.leaseName" . }}
- --lease-duration={{ .Values.leaderElection.leaseDuration }}
- --renew-deadline={{ .Values.leaderElection.renewDeadline }}
- --retry-period={{ .Values.leaderElection.retryPeriod }}
{{- else }}
- --leader-election=false
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/*
Deep merge of two maps as JSON: maps merge key by key, recursively; anything
else in the second argument replaces the first's; a null in the second removes
the key. Unlike sprig's mergeOverwrite, false, 0 and "" in the entry win.
Usage: include "runner-provisioner.deepMerge" (list $base $override) | fromJson
*/}}
{{- define "runner-provisioner.deepMerge" -}}
{{- $dst := deepCopy (index . 0) -}}
{{- range $k, $v := (index . 1) -}}
{{- if kindIs "invalid" $v -}}
{{- $_ := unset $dst $k -}}
{{- else if and (kindIs "map" $v) (kindIs "map" (get $dst $k)) -}}
{{- $_ := set $dst $k (include "runner-provisioner.deepMerge" (list (get $dst $k) $v) | fromJson) -}}
{{- else -}}
{{- $_ := set $dst $k (deepCopy $v) -}}
{{- end -}}
{{- end -}}
{{- toJson $dst -}}
{{- end -}}

{{/*
A pool entry (or poolDefaults) in canonical form: the reference chart's
`spec` (a VMI spec) moved to `template.spec`.
*/}}
{{- define "runner-provisioner.normalizePool" -}}
{{- $p := deepCopy (index . 0) -}}
{{- $where := index . 1 -}}
{{- if hasKey $p "spec" -}}
{{- if and (kindIs "map" $p.template) (hasKey $p.template "spec") -}}
{{- fail (printf "%s: set either spec or template.spec, not both (spec is the reference chart's name for template.spec)" $where) -}}
{{- end -}}
{{- $t := $p.template | default dict -}}
{{- $_ := set $t "spec" $p.spec -}}
{{- $_ := set $p "template" $t -}}
{{- $_ := unset $p "spec" -}}
{{- end -}}
{{- toJson $p -}}
{{- end -}}

{{/* RunnerPool name from a resource class: lowercase, invalid characters to `-`, at most 52. */}}
{{- define "runner-provisioner.poolNameFromClass" -}}
{{- $n := regexReplaceAll "[^a-z0-9-]" (lower .) "-" | trunc 52 -}}
{{- regexReplaceAll "^-+|-+$" $n "" -}}
{{- end -}}

{{/* Secret key of a pool's resource class token in existingSecret: `/` to `.`, other invalid characters to `_`. */}}
{{- define "runner-provisioner.existingSecretKey" -}}
{{- regexReplaceAll "[^-._a-zA-Z0-9]" (replace "/" "." .) "_" -}}
{{- end -}}

{{/*
Every pool, merged and checked: a JSON list of
{key, name, namespace, resourceClass, merged, runnerSecret (or ""), runnerRef}.
*/}}
{{- define "runner-provisioner.pools" -}}
{{- $root := . -}}
{{- $ns := include "runner-provisioner.poolsNamespace" . -}}
{{- $defaults := include "runner-provisioner.normalizePool" (list (.Values.poolDefaults | default dict) "poolDefaults") | fromJson -}}
{{- range $f := list "name" "resourceClass" -}}
{{- if hasKey $defaults $f -}}
{{- fail (printf "poolDefaults.%s: set it per pool, it cannot be shared" $f) -}}
{{- end -}}
{{- end -}}
{{- $out := list -}}
{{- $seen := dict -}}
{{- range $key, $entry := (.Values.pools | default dict) -}}
{{- $where := printf "pools.%q" $key -}}
{{- $e := include "runner-provisioner.normalizePool" (list ($entry | default dict) $where) | fromJson -}}
{{- $base := deepCopy $defaults -}}
{{- /* The entry's choice of user-data source and of tag vs digest wins over the defaults'. */ -}}
{{- if or (hasKey $e "userData") (hasKey $e "userDataSecretRef") -}}
{{- $_ := unset $base "userData" -}}
{{- $_ := unset $base "userDataSecretRef" -}}
{{- end -}}
{{- if and (kindIs "map" $e.runnerBundle) (kindIs "map" $base.runnerBundle) -}}
{{- if or (hasKey $e.runnerBundle "tag") (hasKey $e.runnerBundle "digest") -}}
{{- $_ := unset $base.runnerBundle "tag" -}}
{{- $_ := unset $base.runnerBundle "digest" -}}
{{- end -}}
{{- end -}}
{{- $m := include "runner-provisioner.deepMerge" (list $base $e) | fromJson -}}
{{- $class := $m.resourceClass | default $key -}}
{{- if not (regexMatch "^[a-z0-9_-]+/[A-Za-z0-9:_+-]+$" $class) -}}
{{- fail (printf "%s: %q is not a CircleCI resource class (namespace/name; namespace: a-z 0-9 _ -, name: A-Z a-z 0-9 : _ + -)" $where $class) -}}
{{- end -}}
{{- $name := $m.name | default (include "runner-provisioner.poolNameFromClass" $class) -}}
{{- if or (gt (len $name) 52) (not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $name)) -}}
{{- fail (printf "%s: name %q must be at most 52 lowercase letters, digits and '-', starting and ending with a letter or digit" $where $name) -}}
{{- end -}}
{{- if hasKey $seen $name -}}
{{- fail (printf "%s and pools.%q both render the RunnerPool %q: set `name` on one of them" $where (get $seen $name) $name) -}}
{{- end -}}
{{- $_ := set $seen $name $key -}}
{{- $scaling := $m.scaling | default dict -}}
{{- if not (hasKey $scaling "maxReplicas") -}}
{{- fail (printf "%s: scaling.maxReplicas is required (here or in poolDefaults)" $where) -}}
{{- end -}}
{{- $runnerSecret := "" -}}
{{- $runnerRef := dict -}}
{{- if $m.runnerTokenSecretRef -}}
{{- $runnerRef = $m.runnerTokenSecretRef -}}
{{- else if $root.Values.existingSecret -}}
{{- if $m.token -}}
{{- fail (printf "%s.token is set but existingSecret is used: put the token into Secret %s, key %s (or remove existingSecret)" $where $root.Values.existingSecret (include "runner-provisioner.existingSecretKey" $class)) -}}
{{- end -}}
{{- $runnerRef = dict "name" $root.Values.existingSecret "key" (include "runner-provisioner.existingSecretKey" $class) -}}
{{- else if $m.token -}}
{{- $runnerSecret = printf "%s-runner-token" $name -}}
{{- $runnerRef = dict "name" $runnerSecret "key" "token" -}}
{{- else -}}
{{- fail (printf "%s: set token (the resource class token), existingSecret, or runnerTokenSecretRef" $where) -}}
{{- end -}}
{{- $out = append $out (dict "key" $key "name" $name "namespace" $ns "resourceClass" $class "merged" $m "runnerSecret" $runnerSecret "runnerRef" $runnerRef) -}}
{{- end -}}
{{- if and $out (not $root.Values.existingSecret) (not $root.Values.circleToken) -}}
{{- fail "pools need the CircleCI API token: set circleToken or existingSecret" -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* The RunnerPool spec of one element of "runner-provisioner.pools". */}}
{{- define "runner-provisioner.poolSpec" -}}
{{- $p := index . 0 -}}
{{- $root := index . 1 -}}
{{- $m := $p.merged -}}
{{- $circleci := dict "apiTokenSecretRef" (dict "name" (include "runner-provisioner.apiSecretName" $root) "key" "token") "runnerTokenSecretRef" $p.runnerRef -}}
{{- $apiUrl := "" -}}
{{- if kindIs "map" $m.circleci -}}{{- $apiUrl = $m.circleci.apiUrl | default "" -}}{{- end -}}
{{- $apiUrl = $apiUrl | default $root.Values.circleciAPIAddr -}}
{{- if $apiUrl -}}{{- $_ := set $circleci "apiUrl" $apiUrl -}}{{- end -}}
{{- $spec := dict "resourceClass" $p.resourceClass "circleci" $circleci "scaling" $m.scaling -}}
{{- /* Every other field is a RunnerPool spec field (values.schema.json, generated from the CRD, admits no other). */ -}}
{{- $chartOnly := list "name" "resourceClass" "token" "runnerTokenSecretRef" "labels" "annotations" "circleci" "scaling" "spec" -}}
{{- range $f, $v := $m -}}
{{- if not (has $f $chartOnly) -}}{{- $_ := set $spec $f $v -}}{{- end -}}
{{- end -}}
{{- toYaml $spec -}}
{{- end -}}

{{/*
Checksum over what configures the operator but is not in its pod template:
the API-token Secret (and which Secret it is), plus the command line.
*/}}
{{- define "runner-provisioner.configChecksum" -}}
{{- $cfg := dict "args" (include "runner-provisioner.args" .) "apiSecret" (include (print $.Template.BasePath "/secret-circleci-api.yaml") .) "apiSecretName" (include "runner-provisioner.apiSecretName" .) -}}
{{- toJson $cfg | sha256sum -}}
{{- end -}}
