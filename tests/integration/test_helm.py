"""The Helm chart (helm/ingest) and the container image definition (Dockerfile).

Everything here runs the real tools: the pinned `helm` CLI (`make tools` installs it into .tools/bin)
lints and renders the chart, `kubernetes-validate --strict` checks every rendered manifest offline
against the Kubernetes OpenAPI schemas of several releases, the worker's own `load_config` loads the
rendered config, and `ingest run --help` is the reference for the arguments the chart passes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.cli import build_parser
from ingest.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "ingest"
VALUES_ALL = REPO / "tests" / "integration" / "helm" / "values-all.yaml"
RELEASE = "ingest"
NAMESPACE = "ingest-test"
# Recent Kubernetes releases whose schemas kubernetes-validate bundles (1.25 ... 1.37).
K8S_VERSIONS = ("1.33.0", "1.35.0", "1.37.0")
# Prometheus Operator CRDs: no schema in kubernetes-validate; checked structurally below.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

sys.path.insert(0, str(REPO / "tests" / "integration" / "helm"))
import values_table  # noqa: E402  (lives beside the values files; not a package)

Doc = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Tools


def _find_helm() -> str:
    for candidate in (shutil.which("helm"), REPO / ".tools" / "bin" / "helm"):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail("helm CLI not found on PATH or in .tools/bin: run `make tools` (installs the pinned helm)",
                pytrace=False)


def _find_kubernetes_validate() -> str:
    for candidate in (Path(sys.executable).parent / "kubernetes-validate", shutil.which("kubernetes-validate")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail("kubernetes-validate not found: run `make venv` (it is in the dev extra)", pytrace=False)


@pytest.fixture(scope="session")
def helm() -> str:
    return _find_helm()


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed (rc={proc.returncode}):\n{proc.stderr}", pytrace=False)
    return proc


def template(helm: str, *extra: str, chart: Path = CHART) -> str:
    return run_helm(helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE, *extra).stdout


def docs_of(text: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(text) if d]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[Doc]) -> set[str]:
    return {d["kind"] for d in docs}


@pytest.fixture(scope="session")
def default_text(helm: str) -> str:
    return template(helm)


@pytest.fixture(scope="session")
def all_text(helm: str) -> str:
    return template(helm, "-f", str(VALUES_ALL))


@pytest.fixture(scope="session")
def default_docs(default_text: str) -> list[Doc]:
    return docs_of(default_text)


@pytest.fixture(scope="session")
def all_docs(all_text: str) -> list[Doc]:
    return docs_of(all_text)


@pytest.fixture(scope="session")
def values_all() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(VALUES_ALL.read_text(encoding="utf-8"))
    return data


def pod_spec(docs: list[Doc]) -> Doc:
    spec: Doc = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(docs: list[Doc]) -> Doc:
    containers = pod_spec(docs)["containers"]
    assert len(containers) == 1
    c: Doc = containers[0]
    return c


def worker_config(docs: list[Doc]) -> Doc:
    """The worker config, from the ConfigMap the Deployment mounts."""
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "config")
    config: Doc = yaml.safe_load(one(docs, "ConfigMap", volume["configMap"]["name"])["data"]["config.yaml"])
    return config


# --------------------------------------------------------------------------------------------------
# Lint and offline schema validation


@pytest.mark.parametrize("values", [None, VALUES_ALL], ids=["defaults", "all-options"])
def test_helm_lint_strict_is_clean(helm: str, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    proc = run_helm(helm, *args, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_rendered_manifests_validate_strictly(k8s_version: str, default_text: str, all_text: str,
                                              tmp_path: Path) -> None:
    files = []
    for name, text in (("defaults.yaml", default_text), ("all-options.yaml", all_text)):
        (tmp_path / name).write_text(text, encoding="utf-8")
        files.append(str(tmp_path / name))
    proc = subprocess.run([_find_kubernetes_validate(), "--strict", "-k", k8s_version, *files],
                          capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "ERROR" not in out, out
    # Every Kubernetes object was checked; the only objects without a schema are the Operator's CRDs.
    unchecked = set(re.findall(r"Couldn't find schema for kind (\w+)", out))
    assert unchecked <= CRD_KINDS, out
    docs = docs_of(default_text) + docs_of(all_text)
    passed = re.findall(r"passed for resource (\S+) against version", out)
    assert len(passed) == len([d for d in docs if d["kind"] not in CRD_KINDS]), out


def test_strict_validation_catches_a_wrong_manifest(all_text: str, tmp_path: Path) -> None:
    """The validator is live: an unknown field (strict mode only) and a wrong type are reported."""
    docs = docs_of(all_text)
    one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/"
    one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] = ["two"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(docs), encoding="utf-8")

    def validate(*flags: str) -> str:
        proc = subprocess.run([_find_kubernetes_validate(), *flags, "-k", K8S_VERSIONS[-1], str(bad)],
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode != 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    strict = validate("--strict")
    assert "'pathh' was unexpected" in strict and "spec.minAvailable: ['two']" in strict, strict
    lenient = validate()
    assert "pathh" not in lenient and "spec.minAvailable: ['two']" in lenient, lenient


def test_crd_objects_have_the_operator_shape(all_docs: list[Doc], values_all: dict[str, Any]) -> None:
    sm = one(all_docs, "ServiceMonitor")
    pr = one(all_docs, "PrometheusRule")
    for obj in (sm, pr):
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert obj["metadata"]["namespace"] == "monitoring"
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert set(sm["spec"]) == {"namespaceSelector", "selector", "endpoints"}
    assert set(pr["spec"]) == {"groups"}


# --------------------------------------------------------------------------------------------------
# values.schema.json


@pytest.mark.parametrize(("setting", "path", "expected"), [
    ("replicaCount=many", "/replicaCount", "want integer"),
    ("processes=0", "/processes", "minimum"),
    ("metrics.port=http", "/metrics/port", "want integer"),
    ("credentials.kafka.sasl.enabled=yes", "/credentials/kafka/sasl/enabled", "want boolean"),
    ("config.worker.delivery_guarantee=maybe", "/config/worker/delivery_guarantee", "at-least-once"),
    ("replicas=3", "", "additional properties 'replicas' not allowed"),
])
def test_values_schema_rejects_wrong_values_with_a_clear_message(helm: str, setting: str, path: str,
                                                                  expected: str) -> None:
    proc = run_helm(helm, "template", RELEASE, str(CHART), "--set", setting, check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert f"at '{path}'" in proc.stderr and expected in proc.stderr, proc.stderr


def test_render_time_checks_name_the_problem(helm: str) -> None:
    cases = {
        ("--set", "terminationGracePeriodSeconds=20"): "terminationGracePeriodSeconds (20) must be at least",
        ("--set-string", "config.kafka.sasl\\.password=hunter2"): "config.kafka.sasl.password: a credential",
        ("--set", "metrics.serviceMonitor.enabled=true,metrics.service.enabled=false"): "needs metrics.service",
        ("--set-json", 'accounts=[{"name":"a","subscriptions":[]},{"name":"a","subscriptions":[]}]'):
            'accounts: the name "a" appears twice',
        ("--set", "config.worker.coordination=standalone,replicaCount=2"):
            'config.worker.coordination must be "group" with more than one pod',
        ("--set", "config.worker.coordination=standalone,replicaCount=1,processes=2"):
            'config.worker.coordination must be "group" with more than one process per pod',
        ("--set", "config.worker.coordination=group,processes=2,webhook.enabled=true,"
                  "webhook.publicUrl=https://in.example.com"):
            "processes must be 1 with webhook.enabled",
    }
    for args, message in cases.items():
        proc = run_helm(helm, "template", RELEASE, str(CHART), *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert "hunter2" not in proc.stderr


# --------------------------------------------------------------------------------------------------
# The rendered worker config is what `ingest run --config` loads


def materialize_pod(docs: list[Doc], root: Path,
                    secret_data: dict[tuple[str, str], str]) -> tuple[Path, dict[str, str]]:
    """Lay out the pod's files as the kubelet would, under `root`, and build its environment.

    Returns (config file path, environment). The config's paths are the pod's, so they are mapped
    onto `root` (the only change made to the rendered text).
    """
    spec = pod_spec(docs)
    c = container(docs)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}

    # Secrets: every item of the projected volume becomes a file under its mount path.
    secrets_mount = mounts["secrets"]
    for source in volumes["secrets"]["projected"]["sources"]:
        secret = source["secret"]
        for item in secret["items"]:
            target = root / secrets_mount.lstrip("/") / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(secret_data[(secret["name"], item["key"])] + "\n", encoding="utf-8")

    # The config: the ConfigMap's key at the config volume's mount path.
    cm_name = volumes["config"]["configMap"]["name"]
    configmap = one(docs, "ConfigMap", cm_name)
    config_dir = root / mounts["config"].lstrip("/")
    config_dir.mkdir(parents=True, exist_ok=True)
    for key, text in configmap["data"].items():
        (config_dir / key).write_text(text.replace(secrets_mount, str(root / secrets_mount.lstrip("/"))),
                                      encoding="utf-8")
    config_arg = c["args"][c["args"].index("--config") + 1]
    config_path = root / config_arg.lstrip("/")

    env: dict[str, str] = {}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secret_data[(ref["name"], ref["key"])]
    return config_path, env


def test_rendered_config_loads_with_every_option(all_docs: list[Doc], values_all: dict[str, Any],
                                                 tmp_path: Path) -> None:
    secret_data = {
        ("rc-app", "secret"): "app-client-secret-value",
        ("acme-rc-jwt", "token"): "jwt-of-acme",
        ("ingest-all-account-globex", "jwt"): "jwt-of-globex",
        ("kafka-user", "user"): "ingest-user",
        ("kafka-user", "pass"): "kafka-password-value",
        ("kafka-certs", "ca.pem"): "-----BEGIN CERTIFICATE-----ca",
        ("kafka-certs", "cert.pem"): "-----BEGIN CERTIFICATE-----client",
        ("kafka-certs", "key.pem"): "-----BEGIN PRIVATE KEY-----client",
    }
    config_path, env = materialize_pod(all_docs, tmp_path, secret_data)
    cfg = load_config(config_path, environ=env)

    assert cfg.ringcentral.client_secret == "app-client-secret-value"
    assert cfg.ringcentral.client_id == "app-client-id"
    assert cfg.ringcentral.pubnub_origin == "ps.pndsn.com"
    assert {a.name: a.jwt for a in cfg.accounts} == {"acme": "jwt-of-acme", "globex": "jwt-of-globex"}
    assert sorted(s.spec_id for s in cfg.specs()) == ["acme/messages", "acme/presence", "globex/telephony"]
    # Kafka: the user's properties, the security ones derived from credentials, SASL from the env.
    kafka = cfg.kafka
    for key, value in values_all["config"]["kafka"].items():
        assert kafka[key] == str(value)
    assert kafka["security.protocol"] == "SASL_SSL"
    assert kafka["sasl.mechanism"] == "SCRAM-SHA-256"
    assert kafka["sasl.username"] == "ingest-user"
    assert kafka["sasl.password"] == "kafka-password-value"
    for prop, content in (("ssl.ca.location", "ca"), ("ssl.certificate.location", "client"),
                          ("ssl.key.location", "client")):
        assert Path(kafka[prop]).read_text(encoding="utf-8").strip().endswith(content)
    # Worker, topics, logging as given; the extraEnv override applied on top of the ConfigMap.
    assert cfg.worker.delivery_guarantee == "exactly-once"
    assert cfg.worker.shutdown_timeout_seconds == 20
    assert cfg.worker.renewal_jitter_seconds == 5  # INGEST__WORKER__RENEWAL_JITTER_SECONDS from extraEnv
    assert cfg.topics.prefix == "rc" and cfg.topics.partitions == 12
    assert cfg.topics.routing == {"message-store": "rc.messages"}
    assert cfg.logging.level == "DEBUG"
    # The HTTP server listens where the probes, the container port and the Service point.
    assert cfg.metrics.host == "0.0.0.0"
    assert cfg.metrics.port == 9100 == container(all_docs)["ports"][0]["containerPort"]


def test_rendered_config_of_a_minimal_install_loads(helm: str, tmp_path: Path) -> None:
    """The README's minimal values (client id + one account, default Secret names) give a working config."""
    docs = docs_of(template(
        helm, "--set", "config.ringcentral.client_id=app",
        "--set", "accounts[0].name=acme,accounts[0].subscriptions[0].name=messages",
        "--set", "accounts[0].subscriptions[0].event_filters[0]=/restapi/v1.0/account/~/extension/~/message-store"))
    secret_data = {("ingest-ringcentral", "client_secret"): "s3cret", ("ingest-account-acme", "jwt"): "jwt-acme"}
    config_path, env = materialize_pod(docs, tmp_path, secret_data)
    assert env == {}
    cfg = load_config(config_path, environ=env)
    assert cfg.ringcentral.client_secret == "s3cret"
    assert [a.jwt for a in cfg.accounts] == ["jwt-acme"]
    assert cfg.kafka == {"bootstrap.servers": "kafka:9092"}  # plaintext: no security properties added
    assert cfg.metrics.port == 9095


def test_default_values_name_what_is_missing(default_docs: list[Doc], tmp_path: Path) -> None:
    """Defaults render, but the worker refuses them with a ConfigError naming the key to set."""
    config_path, env = materialize_pod(default_docs, tmp_path, {("ingest-ringcentral", "client_secret"): "x"})
    with pytest.raises(ConfigError, match=r"^ringcentral\.client_id: must not be empty"):
        load_config(config_path, environ=env)


def test_configmap_holds_no_secret_value(all_text: str, all_docs: list[Doc]) -> None:
    cm = one(all_docs, "ConfigMap", "ingest-all")
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert config["ringcentral"]["client_secret_file"] == "/var/run/secrets/ingest/ringcentral/client_secret"
    assert [a["jwt_file"] for a in config["accounts"]] == [
        "/var/run/secrets/ingest/accounts/acme/jwt", "/var/run/secrets/ingest/accounts/globex/jwt"]
    assert "jwtSecret" not in str(config)
    assert not [k for k in config["kafka"] if "password" in k or "username" in k]
    assert "secretKeyRef" not in yaml.safe_dump(cm)


# --------------------------------------------------------------------------------------------------
# Container command = CLI


def run_help() -> str:
    ingest = Path(sys.executable).parent / "ingest"
    proc = subprocess.run([str(ingest), "run", "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_chart_args_are_flags_of_ingest_run(helm: str) -> None:
    help_text = run_help()
    help_flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text))
    assert "--config" in help_flags
    docs = docs_of(template(helm, "--set", "extraArgs[0]=--delete-subscriptions-on-exit"))
    c = container(docs)
    assert "command" not in c, "the chart must use the image's entrypoint (`ingest`)"
    args = c["args"]
    assert args[0] == "run"
    passed = [a for a in args if a.startswith("--")]
    assert passed == ["--config", "--delete-subscriptions-on-exit"]
    assert set(passed) <= help_flags, f"flags not in `ingest run --help`: {set(passed) - help_flags}"
    # And the CLI's own parser takes them as the entrypoint would get them.
    parsed = build_parser().parse_args(args)
    assert parsed.command == "run"
    assert str(parsed.config) == "/etc/ingest/config.yaml"
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert str(parsed.config) == f"{mount['mountPath']}/config.yaml"


def test_processes_per_pod_are_passed_to_ingest_run(helm: str) -> None:
    assert "--processes" not in container(docs_of(template(helm)))["args"]  # one process: the flag's default
    args = container(docs_of(template(helm, "--set", "processes=3")))["args"]
    parsed = build_parser().parse_args(args)
    assert parsed.processes == 3


# --------------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """[(INSTRUCTION, arguments)] per stage; continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    stages: list[list[tuple[str, str]]] = [[]]
    for line in joined.splitlines():
        if not line.strip():
            continue
        instruction, _, rest = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def test_dockerfile_builds_a_slim_non_root_image_with_the_ingest_entrypoint() -> None:
    preamble, *stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage build expected"
    args = dict(a.split("=", 1) for i, a in preamble if i == "ARG")
    base_arg = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+", base_arg), f"base image not pinned by version: {base_arg}"
    # Both stages on the same base by default (the venv's interpreter path); `make image` may pass a
    # local pip-less runtime twin of a local build base (.ci/tools/build-local-base.sh).
    assert args["PYTHON_RUNTIME_IMAGE"] == "${PYTHON_IMAGE}"
    assert stages[0][0][1].split()[0] == "${PYTHON_IMAGE}"
    for stage in stages[1:]:
        assert stage[0][1].split()[0] == "${PYTHON_RUNTIME_IMAGE}"
    final = stages[-1]
    body = " ".join(args for _, args in final)
    # No compilers or caches in the final image.
    for tool in ("gcc", "build-essential", "apt-get install", "pip install", "g++", "make "):
        assert tool not in body, f"{tool!r} in the final stage"
    copies = [a for i, a in final if i == "COPY"]
    assert copies == ["--from=build /opt/ingest /opt/ingest"]
    build = " ".join(args for _, args in stages[0])
    assert "PIP_NO_CACHE_DIR=1" in build and "--only-binary=:all:" in build
    # Non-root, numeric, and the same uid the chart's security context declares.
    user = [a for i, a in final if i == "USER"][-1]
    uid, gid = (int(x) for x in user.split(":"))
    assert uid > 0 and gid > 0
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert values["podSecurityContext"]["runAsUser"] == uid
    assert values["podSecurityContext"]["runAsGroup"] == gid
    # Entrypoint: the console script pyproject.toml installs; default command: the worker.
    entrypoint = json.loads(next(a for i, a in final if i == "ENTRYPOINT"))
    import tomllib
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert entrypoint == ["ingest"] and "ingest" in scripts
    cmd = json.loads(next(a for i, a in final if i == "CMD"))
    parsed = build_parser().parse_args(cmd)
    assert parsed.command == "run" and str(parsed.config) == "/etc/ingest/config.yaml"
    expose = [a for i, a in final if i == "EXPOSE"]
    assert expose == [str(values["metrics"]["port"])]
    from ingest import __version__
    assert f"VERSION={__version__}" in [a for i, a in final if i == "ARG"], "image label version drifted"


def test_dockerignore_lets_in_what_the_wheel_needs() -> None:
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*", "allow-list expected"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    import tomllib
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    needed = {"pyproject.toml", pyproject["project"]["readme"],
              pyproject["tool"]["hatch"]["version"]["path"].split("/")[0],
              *pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"],
              *pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]}
    assert needed <= allowed, needed - allowed
    copied = {a.split()[0].rstrip("/") for stage in dockerfile_stages()[1:-1] for i, a in stage if i == "COPY"}
    assert copied <= allowed, copied - allowed


# --------------------------------------------------------------------------------------------------
# The Deployment and its companions


def test_security_context_is_restrictive(default_docs: list[Doc], all_docs: list[Doc]) -> None:
    for docs in (default_docs, all_docs):
        pod = pod_spec(docs)
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        sc = container(docs)["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        # The only writable path is a size-limited /tmp.
        tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
        assert tmp["emptyDir"]["sizeLimit"]
        assert next(m for m in container(docs)["volumeMounts"] if m["name"] == "tmp")["mountPath"] == "/tmp"
        assert all(m.get("readOnly") for m in container(docs)["volumeMounts"] if m["name"] in {"config", "secrets"})


def test_probes_hit_health_endpoints_on_the_metrics_port(default_docs: list[Doc], all_docs: list[Doc]) -> None:
    for docs in (default_docs, all_docs):
        c = container(docs)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        config = worker_config(docs)
        assert ports == {"metrics": config["metrics"]["port"]}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_grace_period_outlasts_the_flush_timeout(default_docs: list[Doc], all_docs: list[Doc]) -> None:
    for docs in (default_docs, all_docs):
        config = worker_config(docs)
        grace = pod_spec(docs)["terminationGracePeriodSeconds"]
        assert grace >= config["worker"]["shutdown_timeout_seconds"] + 15


def test_config_checksum_rolls_pods_only_when_the_config_changes(helm: str, default_docs: list[Doc]) -> None:
    def checksum(docs: list[Doc]) -> str:
        value: str = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return value

    base = checksum(default_docs)
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert checksum(docs_of(template(helm))) == base
    assert checksum(docs_of(template(helm, "--set", "replicaCount=5"))) == base
    changed = docs_of(template(helm, "--set", "config.worker.renewal_margin_seconds=60"))
    assert checksum(changed) != base
    assert "renewal_margin_seconds: 60" in one(changed, "ConfigMap")["data"]["config.yaml"]


def test_secrets_are_mounted_from_existing_secrets(all_docs: list[Doc]) -> None:
    pod = pod_spec(all_docs)
    projected = next(v for v in pod["volumes"] if v["name"] == "secrets")["projected"]
    assert projected["defaultMode"] == 0o440
    items = {(s["secret"]["name"], i["key"]): i["path"] for s in projected["sources"] for i in s["secret"]["items"]}
    assert items == {
        ("rc-app", "secret"): "ringcentral/client_secret",
        ("acme-rc-jwt", "token"): "accounts/acme/jwt",
        ("ingest-all-account-globex", "jwt"): "accounts/globex/jwt",
        ("kafka-certs", "ca.pem"): "kafka/ca.crt",
        ("kafka-certs", "cert.pem"): "kafka/tls.crt",
        ("kafka-certs", "key.pem"): "kafka/tls.key",
    }
    # fsGroup makes the 0440 files readable by the non-root user.
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert not any(kind == "Secret" for kind in kinds(all_docs)), "the chart must not create Secrets"


def test_extras_and_scheduling_are_passed_through(all_docs: list[Doc], values_all: dict[str, Any]) -> None:
    pod = pod_spec(all_docs)
    c = container(all_docs)
    for var in values_all["extraEnv"]:
        assert var in c["env"]
    assert c["envFrom"] == values_all["extraEnvFrom"]
    for vol in values_all["extraVolumes"]:
        assert vol in pod["volumes"]
    for mount in values_all["extraVolumeMounts"]:
        assert mount in c["volumeMounts"]
    assert c["resources"] == values_all["resources"]
    assert c["image"] == f"{values_all['image']['repository']}@{values_all['image']['digest']}"
    assert c["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == values_all["nodeSelector"]
    assert pod["tolerations"] == values_all["tolerations"]
    assert pod["affinity"] == values_all["affinity"]
    assert pod["priorityClassName"] == "high-priority"
    assert pod["serviceAccountName"] == "ingest-worker"
    meta = one(all_docs, "Deployment")["spec"]["template"]["metadata"]
    assert meta["annotations"]["example.com/owner"] == "platform"
    assert meta["labels"]["tier"] == "ingest"
    assert all(d["metadata"]["labels"]["team"] == "platform" for d in all_docs)


def test_topology_spread_selects_the_worker_pods(default_docs: list[Doc], all_docs: list[Doc]) -> None:
    for docs in (default_docs, all_docs):
        pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
        constraints = pod_spec(docs)["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in constraints} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
        for constraint in constraints:
            selector = constraint["labelSelector"]["matchLabels"]
            assert selector.items() <= pod_labels.items()


def test_default_render_has_the_core_objects_only(default_docs: list[Doc]) -> None:
    assert kinds(default_docs) == {"Deployment", "ConfigMap", "ServiceAccount", "Service", "PodDisruptionBudget"}
    deployment = one(default_docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert one(default_docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_every_option_renders_its_object(all_docs: list[Doc]) -> None:
    assert kinds(all_docs) == {"Deployment", "ConfigMap", "ServiceAccount", "Service", "PodDisruptionBudget",
                               "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"}
    deployment = one(all_docs, "Deployment")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa = one(all_docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert {m["resource"]["name"]: m["resource"]["target"]["averageUtilization"] for m in hpa["spec"]["metrics"]} \
        == {"cpu": 60, "memory": 80}
    pdb = one(all_docs, "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 2,
                           "selector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]}}


def test_service_and_service_monitor_reach_the_metrics_port(all_docs: list[Doc]) -> None:
    deployment = one(all_docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = one(all_docs, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}]
    sm = one(all_docs, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("15s", "5s")
    assert endpoint["metricRelabelings"][0]["action"] == "drop"


def test_prometheus_rule_and_dashboard_come_from_the_single_sources(all_docs: list[Doc]) -> None:
    rules_file = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text(encoding="utf-8"))
    rule = one(all_docs, "PrometheusRule")
    assert rule["spec"]["groups"] == rules_file["groups"]
    assert sum(len(g["rules"]) for g in rule["spec"]["groups"]) > 0
    dashboard_cm = one(all_docs, "ConfigMap", "ingest-all-dashboard")
    assert dashboard_cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard_cm["metadata"]["annotations"] == {"grafana_folder": "Ingest"}
    assert dashboard_cm["metadata"]["namespace"] == "monitoring"
    (key,) = dashboard_cm["data"]
    assert key.endswith(".json")
    source = json.loads((CHART / "files" / "grafana-dashboard.json").read_text(encoding="utf-8"))
    assert json.loads(dashboard_cm["data"][key]) == source


def test_service_account_does_not_mount_an_api_token(all_docs: list[Doc]) -> None:
    sa = one(all_docs, "ServiceAccount")
    assert sa["metadata"]["name"] == "ingest-worker"
    assert sa["automountServiceAccountToken"] is False
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


# --------------------------------------------------------------------------------------------------
# NOTES.txt and README


@pytest.fixture
def notes_chart(tmp_path: Path) -> Iterator[Path]:
    """A copy of the chart whose NOTES.txt is also rendered as a manifest (helm template skips NOTES)."""
    chart = tmp_path / "ingest"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text(encoding="utf-8")
    (chart / "templates" / "notes-under-test.yaml").write_text(
        '{{- define "notes-under-test" }}' + notes + '{{- end }}\nnotes: {{ include "notes-under-test" . | toJson }}\n',
        encoding="utf-8")
    yield chart


def render_notes(helm: str, chart: Path, *extra: str) -> str:
    out = template(helm, "--show-only", "templates/notes-under-test.yaml", *extra, chart=chart)
    notes: str = yaml.safe_load(out)["notes"]
    return notes


def test_notes_list_the_secrets_and_warn_about_idle_pods(helm: str, notes_chart: Path) -> None:
    notes = render_notes(helm, notes_chart, "-f", str(VALUES_ALL))
    for line in ("rc-app  key secret", "acme-rc-jwt  key token", "ingest-all-account-globex  key jwt",
                 "kafka-user  keys user, pass", "kafka-certs  key ca.pem, cert.pem, key.pem",
                 "port-forward service/ingest-all-metrics 9100"):
        assert line in notes, notes
    assert "WARNING" not in notes and "NOT CONFIGURED" not in notes
    defaults = render_notes(helm, notes_chart, "--set", "replicaCount=8")
    assert "NOT CONFIGURED YET" in defaults
    assert "up to 8 worker pods but only 6 spec partitions" in defaults


def test_readme_values_table_is_up_to_date() -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    current = readme[readme.index(values_table.BEGIN) + len(values_table.BEGIN):readme.index(values_table.END)]
    assert current.strip() == values_table.table().strip(), "run: python tests/integration/helm/values_table.py"
    documented = {path for path, _ in values_table.documented_values(
        (CHART / "values.yaml").read_text(encoding="utf-8"))}
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    # Every top-level value is documented, itself or through its children.
    for key in values:
        assert key in documented or any(p.startswith(key + ".") for p in documented), key


def test_chart_version_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert chart["apiVersion"] == "v2"
    from ingest import __version__
    assert chart["appVersion"] == __version__


def test_packaged_chart_renders_the_same(helm: str, all_text: str, tmp_path: Path) -> None:
    """`helm package` keeps what the templates read (files/) and leaves development files out."""
    run_helm(helm, "package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("ingest-*.tgz")
    packaged = template(helm, "-f", str(VALUES_ALL), chart=archive)
    assert packaged == all_text
    listing = subprocess.run(["tar", "tzf", str(archive)], capture_output=True, text=True, check=True).stdout.split()
    assert "ingest/files/prometheus-rules.yaml" in listing and "ingest/files/grafana-dashboard.json" in listing
    assert not [name for name in listing if name.endswith(".test.yaml")]


# --------------------------------------------------------------------------------------------------
# WebHook ingress (webhook.enabled): a Service and an optional Ingress in front of the receiver

VALUES_WEBHOOK = REPO / "tests" / "integration" / "helm" / "values-webhook.yaml"


@pytest.fixture(scope="session")
def webhook_text(helm: str) -> str:
    return template(helm, "-f", str(VALUES_WEBHOOK))


def test_webhook_chart_lints_and_validates_strictly(helm: str, webhook_text: str, tmp_path: Path) -> None:
    lint = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(VALUES_WEBHOOK), check=False)
    assert lint.returncode == 0 and "[WARNING]" not in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    rendered = tmp_path / "webhook.yaml"
    rendered.write_text(webhook_text, encoding="utf-8")
    proc = subprocess.run([_find_kubernetes_validate(), "--strict", "-k", K8S_VERSIONS[-1], str(rendered)],
                          capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "ERROR" not in out, out
    assert len(re.findall(r"passed for resource (\S+) against version", out)) == len(docs_of(webhook_text)), out


def test_webhook_service_and_ingress_reach_the_receiver_of_ready_pods(webhook_text: str) -> None:
    docs = docs_of(webhook_text)
    ports = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}
    assert ports == {"metrics": 9095, "webhook": 8443}
    # A Service sends only to ready pods; /readyz fails while the receiver is not listening or its
    # subscription table is not loaded (tests/integration/webhook/test_worker.py::test_readiness_covers_the_receiver).
    assert container(docs)["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    service = one(docs, "Service", "ingest-webhook")
    assert service["spec"]["selector"].items() <= one(docs, "Deployment")["spec"]["template"]["metadata"][
        "labels"].items()
    assert service["spec"]["ports"] == [{"name": "webhook", "port": 8080, "targetPort": "webhook", "protocol": "TCP"}]
    assert service["metadata"]["annotations"] == {"example.com/owner": "platform"}
    ingress = one(docs, "Ingress", "ingest-webhook")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["hooks.example.com"], "secretName": "hooks-example-com-tls"}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "hooks.example.com"
    assert rule["http"]["paths"] == [{"path": "/rc/ringcentral/webhook", "pathType": "Exact", "backend": {
        "service": {"name": "ingest-webhook", "port": {"name": "webhook"}}}}]


def test_webhook_rendered_config_loads_and_listens_where_the_service_points(webhook_text: str,
                                                                           tmp_path: Path) -> None:
    docs = docs_of(webhook_text)
    secret_data = {("ingest-ringcentral", "client_secret"): "s3cret", ("ingest-account-acme", "jwt"): "jwt-acme"}
    config_path, env = materialize_pod(docs, tmp_path, secret_data)
    cfg = load_config(config_path, environ=env)
    assert cfg.transport == "webhook" and cfg.worker.coordination == "group"
    assert cfg.webhook is not None
    # RingCentral POSTs to the public URL; the pod sees the same path (the Ingress does not rewrite it).
    assert cfg.webhook.address == "https://hooks.example.com/rc/ringcentral/webhook"
    assert (cfg.webhook.host, cfg.webhook.port, cfg.webhook.path) == ("0.0.0.0", 8443, "/rc/ringcentral/webhook")
    assert cfg.webhook.answer_timeout_seconds == 1.5  # config.webhook passes through


def test_webhook_values_are_checked_at_render_time(helm: str) -> None:
    cases = {
        ("--set", "webhook.enabled=true"): 'webhook.publicUrl: an https URL is required with webhook.enabled',
        ("--set", "webhook.enabled=true,webhook.publicUrl=https://h.example,webhook.port=9095"):
            "webhook.port: must differ from metrics.port (9095)",
        ("--set", "webhook.port=http"): "at '/webhook/port'",
        ("--set", "webhook.publicUrl=http://h.example"): "at '/webhook/publicUrl'",
        ("--set", "webhook.ingress.host=h.example"): "additional properties 'host' not allowed",
    }
    for args, message in cases.items():
        proc = run_helm(helm, "template", RELEASE, str(CHART), *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)


def test_webhook_objects_only_when_enabled(default_docs: list[Doc]) -> None:
    assert [s["metadata"]["name"] for s in default_docs if s["kind"] == "Service"] == ["ingest-metrics"]
    assert "transport" not in worker_config(default_docs) and "webhook" not in worker_config(default_docs)
    assert [p["name"] for p in container(default_docs)["ports"]] == ["metrics"]
