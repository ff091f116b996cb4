#!/usr/bin/env bash
# `make verify-chart`: install the chart into a real Kubernetes API server and let the server
# validate every object.
#
# Starts Debian's etcd and a kube-apiserver built by .ci/tools/install-kube-apiserver.sh (no
# controllers, no nodes: the server stores and validates objects, nothing runs pods), applies the
# ServiceMonitor and PrometheusRule CRDs from prometheus-operator's published definitions (its Go
# module ships them), then, for the default values, tests/integration/helm/values-all.yaml and
# tests/integration/helm/values-webhook.yaml:
#
#   1. every rendered object through a server-side dry run with strict field validation
#      (`kubectl apply --server-side --dry-run=server --validate=strict`);
#   2. `helm install`, then each object of the release read back from the server;
#   3. `helm upgrade` (a changed log level; the server's ConfigMap shows it);
#   4. `helm uninstall`, then no object of the release is left.
#
# Needs helm and kubectl/kube-apiserver on PATH (the Makefile puts .tools/bin first). Everything it
# starts is stopped on exit; its files live in a temporary directory that is removed.
set -euo pipefail
cd "$(dirname "$0")/../.."

PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"
CHART=helm/ingest
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/ingest"

say() { echo "verify-chart: $*"; }
fail() {
  echo "verify-chart: FAILED: $*" >&2
  for server_log in "${work:-/nonexistent}"/*.log; do
    [ -f "$server_log" ] && { echo "--- last lines of $(basename "$server_log")"; tail -n 15 "$server_log"; } >&2
  done
  exit 1
}

bash .ci/tools/install-debian-packages.sh etcd-server openssl
for tool in helm kubectl kube-apiserver etcd openssl go; do
  command -v "$tool" >/dev/null || fail "$tool not found on PATH"
done

work="$(mktemp -d /tmp/verify-chart.XXXXXX)"
pids=()
stop() {  # stop PID: SIGTERM, SIGKILL after 30 s (an apiserver whose etcd is gone never exits)
  kill "$1" 2>/dev/null || return 0
  for _ in $(seq 30); do kill -0 "$1" 2>/dev/null || break; sleep 1; done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
cleanup() {  # the apiserver before its etcd
  for (( i = ${#pids[@]} - 1; i >= 0; i-- )); do stop "${pids[$i]}"; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_for() {  # wait_for WHAT SECONDS COMMAND...: until COMMAND succeeds (fails at once if a server exits)
  local what="$1" seconds="$2"; shift 2
  local deadline=$(( $(date +%s) + seconds ))
  until "$@" >/dev/null 2>&1; do
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || fail "$what: a server exited"; done
    [ "$(date +%s)" -lt "$deadline" ] || fail "$what: not within $seconds s"
    sleep 1
  done
}

# ---- etcd and kube-apiserver -------------------------------------------------------------------
etcd_port="$(free_port)"; etcd_peer_port="$(free_port)"; api_port="$(free_port)"
etcd --name verify-chart --data-dir "$work/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster "verify-chart=http://127.0.0.1:$etcd_peer_port" >"$work/etcd.log" 2>&1 &
pids+=($!)
wait_for "etcd $(etcd --version | head -n1)" 60 \
  bash -c "exec 3<>/dev/tcp/127.0.0.1/$etcd_port"

# The service-account signing key (required flags) and one static admin token (group system:masters).
# No endpoint reconciler: it refuses a loopback advertise address, and no client here uses the
# `kubernetes` Service's endpoints.
openssl genrsa -out "$work/sa.key" 2048 2>/dev/null
token="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
echo "$token,verify-chart-admin,verify-chart-admin,system:masters" > "$work/tokens.csv"

kube-apiserver --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
  --endpoint-reconciler-type none \
  --cert-dir "$work/certs" --token-auth-file "$work/tokens.csv" --authorization-mode RBAC \
  --service-account-key-file "$work/sa.key" --service-account-signing-key-file "$work/sa.key" \
  --service-account-issuer https://kubernetes.default.svc --service-cluster-ip-range 10.96.0.0/16 \
  >"$work/apiserver.log" 2>&1 &
pids+=($!)

export KUBECONFIG="$work/kubeconfig"
kubectl config set-cluster verify --server "https://127.0.0.1:$api_port" --insecure-skip-tls-verify=true >/dev/null
kubectl config set-credentials admin --token "$token" >/dev/null
kubectl config set-context verify --cluster verify --user admin >/dev/null
kubectl config use-context verify >/dev/null
wait_for "kube-apiserver ready" 180 kubectl get --raw /readyz
server_version="$(kubectl version -o json | python3 -c 'import json, sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')"
say "kube-apiserver $server_version on 127.0.0.1:$api_port, $(etcd --version | head -n1)"

# ---- the monitoring CRDs (prometheus-operator's published definitions) ---------------------------
crd_dir="$(GOMODCACHE="$cache_root/go/mod" GOFLAGS=-modcacherw GOTOOLCHAIN=local \
  go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
  | sed -n -E 's/^[[:space:]]*"Dir": "(.*)",?$/\1/p')/example/prometheus-operator-crd"
for kind in servicemonitors prometheusrules; do
  kubectl apply --server-side -f "$crd_dir/monitoring.coreos.com_$kind.yaml" >/dev/null
  kubectl wait --for condition=established --timeout 60s "crd/$kind.monitoring.coreos.com" >/dev/null
done
say "CRDs servicemonitors and prometheusrules (prometheus-operator $PROMETHEUS_OPERATOR_VERSION) established"

# ---- the chart ---------------------------------------------------------------------------------
release_objects() {  # release_objects RELEASE: namespace/kind/name of each object of RELEASE the server holds
  kubectl get --all-namespaces -l "app.kubernetes.io/instance=$1" \
    "$(kubectl api-resources --verbs list --namespaced -o name | grep -vx endpoints | paste -sd, -)" \
    -o jsonpath='{range .items[*]}{.metadata.namespace}/{.kind}/{.metadata.name}{"\n"}{end}' | sort
}

verify_values() {  # verify_values RELEASE NAMESPACE [HELM ARGS...]
  local release="$1" namespace="$2"; shift 2
  helm template "$release" "$CHART" -n "$namespace" "$@" > "$work/$release.yaml"
  local rendered extra_namespaces
  rendered="$(grep -c '^kind:' "$work/$release.yaml")"
  # Objects without a namespace go to the release's; some values place objects elsewhere (monitoring).
  extra_namespaces="$(sed -n 's/^  namespace: *//p' "$work/$release.yaml" | tr -d '"' | sort -u)"
  for ns in "$namespace" $extra_namespaces; do
    kubectl get namespace "$ns" >/dev/null 2>&1 || kubectl create namespace "$ns" >/dev/null
  done
  kubectl config set-context --current --namespace "$namespace" >/dev/null
  kubectl apply --server-side --dry-run=server --validate=strict --field-manager verify-chart \
    -f "$work/$release.yaml" >/dev/null \
    || fail "$release: the server rejected a rendered object"
  say "$release: $rendered rendered objects pass the server's dry run (strict field validation)"

  helm install "$release" "$CHART" -n "$namespace" "$@" >/dev/null
  local objects
  objects="$(release_objects "$release")"
  [ "$(echo "$objects" | grep -c .)" -eq "$rendered" ] \
    || fail "$release: $rendered objects rendered, the server holds: $objects"
  say "$release: helm install created $(echo "$objects" | tr '\n' ' ')"

  helm upgrade "$release" "$CHART" -n "$namespace" "$@" --set config.logging.level=ERROR >/dev/null
  kubectl get configmap --all-namespaces -l "app.kubernetes.io/instance=$release" -o yaml | grep -q 'level: ERROR' \
    || fail "$release: after helm upgrade --set config.logging.level=ERROR the ConfigMap does not say so"
  say "$release: helm upgrade -> revision $(helm history "$release" -n "$namespace" --max 1 -o json \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)[-1]["revision"])'), the server's ConfigMap has the new log level"

  helm uninstall "$release" -n "$namespace" >/dev/null
  objects="$(release_objects "$release")"
  [ -z "$objects" ] || fail "$release: left after helm uninstall: $objects"
  say "$release: helm uninstall left no object"
}

verify_values ingest-default verify-default
verify_values ingest-all verify-all -f tests/integration/helm/values-all.yaml
verify_values ingest-webhook verify-webhook -f tests/integration/helm/values-webhook.yaml
say "PASSED: chart $(sed -n 's/^version: //p' "$CHART/Chart.yaml") against kube-apiserver $server_version"
