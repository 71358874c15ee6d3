"""deploy/: manifests that parse and agree with the CLI, a dashboard and monitors Datadog's
own client models load whole, and only metric names and tags the worker really sends."""

from __future__ import annotations

import json
import re
import shlex
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from datadog_api_client import ApiClient, Configuration
from datadog_api_client.model_utils import ModelComposed, ModelNormal, OpenApiModel, UnparsedObject
from datadog_api_client.v1.model.dashboard import Dashboard
from datadog_api_client.v1.model.monitor import Monitor

from tests.conftest import ROOT, TOKEN_A
from worker.cli import build_parser
from worker.metrics.statsd import NAMESPACE, StatsdMetrics
from worker.metrics.target import StatsdTarget
from worker.outcome import Failure, Outcome, Status

DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
DATADOG = DEPLOY / "datadog"
MONITORS = sorted((DATADOG / "monitors").glob("*.json"))
METRIC = re.compile(r"\b" + NAMESPACE + r"\.[a-z_]+(?:\.[a-z_]+)*")
#: Tags every metric carries besides its own (DogStatsD's constant and unified-service tags).
COMMON_TAGS = {"site", "mode", "consumer", "env", "service", "version"}


def manifests() -> list[dict[str, Any]]:
    """Every YAML document under deploy/, each with the file it came from."""
    docs = []
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), f"{path}: a document that is not a mapping"
            docs.append({**doc, "_file": path.name})
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in manifests() if d["kind"] == kind]


def container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod_spec["containers"]
    assert isinstance(only, dict)
    return only


def env_of(spec: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in spec.get("env", [])}


def expand(args: list[str], env: dict[str, Any]) -> list[str]:
    """``$(VAR)`` as Kubernetes expands it, with a stand-in for values it takes at run time."""
    stand_in = {"REDIS_URL": "redis://:password@redis:6379/0", "POD_NAME": "worker-abc12"}
    return [re.sub(r"\$\((\w+)\)", lambda m: stand_in.get(m[1], str(env.get(m[1]))), a)
            for a in args]  # fmt: skip


def strict(model: Any, where: str) -> None:
    """Fail on anything the client's models did not take: an unknown oneOf (a widget type,
    a request shape) or a field the model does not define (a misspelt key)."""
    if isinstance(model, list):
        for i, item in enumerate(model):
            strict(item, f"{where}[{i}]")
    elif isinstance(model, dict):
        for key, value in model.items():
            strict(value, f"{where}.{key}")
    elif isinstance(model, UnparsedObject) or (isinstance(model, OpenApiModel)
                                               and model._unparsed):  # fmt: skip
        raise AssertionError(f"{where}: the model could not parse {model}")
    elif isinstance(model, ModelComposed):
        strict(model.get_oneof_instance(), where)  # type: ignore[no-untyped-call]
    elif isinstance(model, ModelNormal):
        known = type(model).openapi_types
        for key, value in model._data_store.items():
            assert key in known, f"{where}.{key}: not a field of {type(model).__name__}"
            strict(value, f"{where}.{key}")


def load(path: Path, model: type[Any]) -> Any:
    """``path`` deserialised by the official client, as it deserialises an API answer."""
    client = ApiClient(Configuration())  # type: ignore[no-untyped-call]
    loaded = client.deserialize(path.read_text(), (model,), True)
    assert isinstance(loaded, model), f"{path}: not a {model.__name__}"
    strict(loaded, path.name)
    return loaded


@pytest.fixture(scope="module")
def emitted() -> dict[str, set[str]]:
    """Every metric the worker sends and its tag names, caught on a real UDP socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    metrics = StatsdMetrics(StatsdTarget("127.0.0.1", sock.getsockname()[1]), site="local",
                            mode="queue", consumer="w1")  # fmt: skip
    now = time.time()

    def outcome(status: Status, code: str | None = None, attempts: int = 1) -> Outcome:
        failure = Failure(code, "x") if code else None
        return Outcome(TOKEN_A, ["a@example.com"], status, None, attempts, now, now, failure,
                       reason="already_invited" if status is Status.SKIPPED else None)  # fmt: skip

    metrics.request("invite", 429, 0.1)
    metrics.request("invite", None, 0.1)
    metrics.budget(10)
    for each in (outcome(Status.SENT), outcome(Status.SKIPPED),
                 outcome(Status.FAILED, "token_not_found", 0),
                 outcome(Status.FAILED, "server_error")):  # fmt: skip
        metrics.outcome(each)
    metrics.rejected("invalid_email")
    metrics.retry("server_error")
    metrics.reconciled("created")
    metrics.dead_lettered("bad_request", 2)
    metrics.finished(1, "incomplete")
    metrics.close()
    found: dict[str, set[str]] = {}
    try:
        while True:
            for line in sock.recv(65535).decode().splitlines():
                head, *fields = line.split("|")
                tags = next((f[1:].split(",") for f in fields if f.startswith("#")), [])
                found.setdefault(head.split(":")[0], set()).update(t.split(":")[0] for t in tags)
    except TimeoutError:
        pass
    finally:
        sock.close()
    assert found, "no metric arrived"
    return found


def queries(doc: Any) -> Iterator[str]:
    """Every metric query string in a dashboard or monitor document."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in ("q", "query") and isinstance(value, str):
                yield value
            else:
                yield from queries(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from queries(item)


def test_every_manifest_parses_and_names_its_kind() -> None:
    """Each YAML document under deploy/ loads and has apiVersion, kind and a name."""
    docs = manifests()
    assert {d["kind"] for d in docs} >= {"CronJob", "Deployment", "ScaledObject",
                                         "PersistentVolumeClaim", "Secret"}  # fmt: skip
    for doc in docs:
        assert doc["apiVersion"], doc["_file"]
        assert doc["metadata"]["name"], doc["_file"]


def test_the_cronjob_runs_a_file_once_at_a_time_with_its_report_keys_and_agent() -> None:
    """File mode, Forbid, the report on a claim, keys as files from a Secret, DD_AGENT_HOST
    from the downward API, non-root; its arguments are ones `run` accepts."""
    (cron,) = by_kind("CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    spec = container(pod)
    env = env_of(spec)
    assert env["DD_AGENT_HOST"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert "DD_API_KEY" not in env
    assert "DD_APP_KEY" not in env
    args = build_parser().parse_args(expand(spec["args"], env))
    assert args.command == "run"
    assert not args.source.startswith("redis")  # file mode
    mounts = {m["name"]: m["mountPath"] for m in spec["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    report_volume = next(n for n, p in mounts.items() if str(args.report).startswith(p + "/"))
    claim = volumes[report_volume]["persistentVolumeClaim"]["claimName"]
    assert claim in {d["metadata"]["name"] for d in by_kind("PersistentVolumeClaim")}
    keys = next(n for n, p in mounts.items() if env["DD_API_KEY_FILE"].startswith(p + "/"))
    secret = volumes[keys]["secret"]["secretName"]
    (shape,) = [s for s in by_kind("Secret") if s["metadata"]["name"] == secret]
    for variable in ("DD_API_KEY_FILE", "DD_APP_KEY_FILE"):
        assert Path(env[variable]).name in shape["stringData"], variable
    # Longer than --grace, so a SIGTERM lets the run finish its requests and its report.
    assert pod["terminationGracePeriodSeconds"] > args.grace


def test_keda_scales_the_queue_workers_on_their_groups_pending_entries() -> None:
    """The ScaledObject targets the Deployment, with KEDA's redis-streams trigger on the
    stream and group the workers' own arguments name, within min/max replica bounds."""
    (deployment,) = by_kind("Deployment")
    (scaled,) = by_kind("ScaledObject")
    spec = container(deployment["spec"]["template"]["spec"])
    env = env_of(spec)
    args = build_parser().parse_args(expand(spec["args"], env))
    assert args.source.startswith("redis://")
    assert not args.until_empty  # a long-running worker; KEDA decides how many
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"]  # KEDA's to set; an apply must not reset it
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"] <= 20
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    meta = trigger["metadata"]
    assert meta["stream"] == args.stream
    assert meta["consumerGroup"] == args.group
    assert meta["pendingEntriesCount"].isdigit()  # KEDA reads metadata values as strings
    assert int(meta["pendingEntriesCount"]) > 0
    assert re.fullmatch(r"[\w.-]+:\d+", meta["address"])
    auth = trigger["authenticationRef"]["name"]
    assert auth in {d["metadata"]["name"] for d in by_kind("TriggerAuthentication")}
    assert (
        "maxReplicaCount"
        in (KUBERNETES / "keda-scaledobject.yaml").read_text().split("apiVersion")[0]
    )  # the note on it comes first
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > args.grace


def test_the_dashboard_loads_whole_in_the_official_model() -> None:
    """dashboard.json is a Dashboard for datadog-api-client, every widget and field known."""
    dashboard = load(DATADOG / "dashboard.json", Dashboard)
    assert len(dashboard.widgets) >= 8
    text = (DATADOG / "dashboard.json").read_text()
    for wanted in ("emails.sent", "emails.failed", "emails.refused", "requests.throttled",
                   "ratelimit.remaining", "request.latency", "messages.dead_lettered"):  # fmt: skip
        assert f"{NAMESPACE}.{wanted}" in text, wanted


def test_the_monitors_load_whole_in_the_official_model() -> None:
    """Each monitor file is a Monitor for datadog-api-client: a failed run, 429s, dead letters."""
    assert {p.stem for p in MONITORS} >= {"run-failed", "no-successful-run", "throttled",
                                          "dead-letters"}  # fmt: skip
    for path in MONITORS:
        monitor = load(path, Monitor)
        assert str(monitor.type) == "query alert", path.name
        assert monitor.message.strip(), path.name
        critical = monitor.options.thresholds.critical
        assert re.search(rf"[<>]=? *{critical:g}$", monitor.query), path.name


def test_a_model_that_cannot_parse_fails_the_check(tmp_path: Path) -> None:
    """The check is not lenient: a misspelt field or an unknown widget type fails it."""
    good = json.loads((DATADOG / "dashboard.json").read_text())
    for broken in (
        {**good, "widgetz": []},
        {**good, "widgets": [{"definition": {"type": "timeseriez", "requests": []}}]},
    ):
        path = tmp_path / "broken.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(AssertionError):
            load(path, Dashboard)


def test_every_metric_and_tag_used_in_deploy_is_one_the_worker_sends(
    emitted: dict[str, set[str]],
) -> None:
    """No widget or monitor watches a metric the code does not send, or groups by a tag it
    does not set."""
    docs = [json.loads((DATADOG / "dashboard.json").read_text())]
    docs += [json.loads(p.read_text()) for p in MONITORS]
    used: set[str] = set()
    for query in (q for doc in docs for q in queries(doc)):
        for name in METRIC.findall(query):
            used.add(name)
            assert name in emitted, f"{name} (in {query!r}) is not sent by the worker"
            scope = query[query.index(name) + len(name) :]
            filters = re.match(r"\{([^}]*)\}(?: by \{([^}]*)\})?", scope)
            assert filters, query
            words = [w.strip().lstrip("!") for part in filters.groups() if part
                     for w in part.split(",")]  # fmt: skip
            for word in words:
                if word in ("*", "") or word.startswith("$"):
                    continue
                tag = word.split(":")[0]
                assert tag in emitted[name] | COMMON_TAGS, f"{name} has no tag {tag!r}"
    assert used >= {f"{NAMESPACE}.runs.finished", f"{NAMESPACE}.messages.dead_lettered"}
    for text in (p.read_text() for p in DEPLOY.rglob("*") if p.is_file()):
        for name in METRIC.findall(text):
            assert name in emitted, name


def test_the_kubernetes_argument_lists_are_what_a_shell_would_pass() -> None:
    """No argument hides a space or a quote a reader would take for two arguments."""
    for doc in by_kind("CronJob") + by_kind("Deployment"):
        pod = (doc["spec"].get("jobTemplate", {}).get("spec", doc["spec"]))["template"]["spec"]
        for arg in container(pod)["args"]:
            assert shlex.split(arg) == [arg], arg
