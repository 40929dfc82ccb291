"""Deployment artifacts: Dockerfile, docker-compose.yml, Prometheus scrape config, Grafana provisioning/dashboard.

There is no Docker engine on the test machines, so what can be checked here is: `docker-compose config`
accepts the compose file, `promtool check config` accepts the scrape config, a real Prometheus parses every
dashboard query, the dashboard only queries metrics of the server's metric contract, and the container entry
point links the baked default model. The `live_server` tests additionally need a running drllm server (the
`server_url` fixture from tests/conftest.py): the dashboard's metrics in a live /metrics scrape, and a real
Prometheus scraping the server through the repo's scrape config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
ENTRYPOINT = ROOT / "deploy" / "docker-entrypoint.sh"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "drllm.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "drllm.yml"

# The server's metric contract: family name -> type (all carry the label `model`).
HISTOGRAMS = {
    "drllm_request_layers_executed",
    "drllm_request_layers_skipped",
    "drllm_request_layers_repeated",
    "drllm_e2e_request_latency_seconds",
    "drllm_time_to_first_token_seconds",
    "drllm_inter_token_latency_seconds",
    "drllm_request_queue_time_seconds",
    "drllm_request_budget",
}
COUNTERS = {  # exposed under these names (prometheus_client appends `_total` to counters)
    "drllm_routing_decisions_total",
    "drllm_requests_total",
    "drllm_request_finished_total",
    "drllm_prompt_tokens_total",
    "drllm_generation_tokens_total",
}
GAUGES = {"drllm_num_requests_running", "drllm_num_requests_waiting"}
CONTRACT = {**{m: "histogram" for m in HISTOGRAMS}, **{m: "counter" for m in COUNTERS},
            **{m: "gauge" for m in GAUGES}}
LABELS = {"model", "layer", "decision", "status_class", "finish_reason", "le", "job", "instance"}
# Series a histogram family exposes; `_created` series exist too but are never charted.
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def family_of(series: str) -> str | None:
    """The contract family a queried series belongs to, or None. Suffixes are only stripped where the
    family's type has them: `_bucket/_sum/_count` for histograms; counters are queried by their `_total` name."""
    if series in COUNTERS or series in GAUGES:
        return series
    for suffix in HISTOGRAM_SUFFIXES:
        if series.endswith(suffix) and series[: -len(suffix)] in HISTOGRAMS:
            return series[: -len(suffix)]
    return None


# --- PromQL parsing (enough of it for the dashboard's queries) -----------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "atan2", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENT = re.compile(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


def promql_metrics(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions, keywords, labels
    (inside {...} or by/without/on(...)), strings, durations or Grafana variables."""
    s = _STRING.sub('""', expr)
    s = _MATCHERS.sub("", s)
    s = _RANGE.sub("", s)
    s = _GROUPING.sub(" ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    names = set()
    for m in _IDENT.finditer(s):
        name, call = m.group(1), m.group(2)
        if call or name in _KEYWORDS:
            continue
        names.add(name)
    return names


def promql_labels(expr: str) -> set[str]:
    """Label names an expression matches on or aggregates by (not the strings of label_replace)."""
    s = _STRING.sub('""', expr)
    labels = set()
    for body in _MATCHERS.findall(s):
        labels.update(_MATCHER_LABEL.findall(body))
    for _, body in _GROUPING.findall(s):
        labels.update(x.strip() for x in body.split(",") if x.strip())
    return labels


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows keep their panels inside
    return out


def dashboard_exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p.get("targets", []) if t.get("expr")]


def dashboard_variable_metrics(dashboard: dict) -> set[str]:
    names = set()
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.match(r"\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*(?:\{[^}]*\})?\s*,", q)
        if m:
            names.add(m.group(1))
        else:
            m = re.match(r"\s*query_result\((.*)\)\s*$", q, re.S)
            if m:
                names |= promql_metrics(m.group(1))
    return names


def dashboard_series(dashboard: dict) -> set[str]:
    names = set(dashboard_variable_metrics(dashboard))
    for expr in dashboard_exprs(dashboard):
        names |= promql_metrics(expr)
    return names


def grafana_to_promql(expr: str) -> str:
    """Substitute Grafana's variables the way Grafana would before sending a query."""
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "5m")
            .replace("${model}", ".*").replace("$model", ".*"))


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


# --- the regex parser itself ---------------------------------------------------------------------------------

def test_promql_metric_parser():
    expr = ('histogram_quantile(0.9, sum by (le) (rate(drllm_time_to_first_token_seconds_bucket'
            '{model=~"$model", decision="skip"}[$__rate_interval])))')
    assert promql_metrics(expr) == {"drllm_time_to_first_token_seconds_bucket"}
    expr = ('label_replace(sum by (layer, decision) (increase(drllm_routing_decisions_total{model=~"a|b"}[5m])) '
            '/ on (layer) group_left sum by (layer) (increase(drllm_routing_decisions_total[5m])), '
            '"layer", "0$1", "layer", "([0-9])")')
    assert promql_metrics(expr) == {"drllm_routing_decisions_total"}
    assert promql_labels(expr) == {"layer", "decision", "model"}
    assert promql_metrics("sum(rate(a_total[1m])) / sum(rate(b_count[1m])) * 1e-3 + up") == {"a_total", "b_count", "up"}
    assert family_of("drllm_request_layers_executed_bucket") == "drllm_request_layers_executed"
    assert family_of("drllm_requests_total") == "drllm_requests_total"
    assert family_of("drllm_requests") is None  # counters are queried by their _total name
    assert family_of("drllm_num_requests_running_total") is None
    assert family_of("drllm_requests_total_count") is None
    assert family_of("drllm_request_budget") is None  # a histogram has no bare series


# --- dashboard -------------------------------------------------------------------------------------------------

def test_dashboard_queries_only_contract_metrics(dashboard):
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 20
    series = dashboard_series(dashboard)
    unknown = sorted(s for s in series if family_of(s) is None)
    assert not unknown, f"dashboard queries metrics the server does not export: {unknown}"
    # ... and it charts every family of the contract
    assert {family_of(s) for s in series} == set(CONTRACT)
    for expr in exprs:
        assert promql_labels(expr) <= LABELS, expr
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"by \([^)]*\ble\b", expr), expr
        for s in promql_metrics(expr):
            if CONTRACT[family_of(s)] == "counter" or s.endswith(HISTOGRAM_SUFFIXES):
                assert re.search(rf"(rate|increase)\(\s*{s}\b", expr), f"{s} must be rated: {expr}"
        assert 'model=~"$model"' in expr, f"query ignores the model selector: {expr}"


def test_dashboard_structure(dashboard):
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
    ds_uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == ds_uid
    assert variables["model"]["includeAll"] and variables["model"]["allValue"] == ".*"
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
    by_type: dict[str, list[dict]] = {}
    for p in panels:
        by_type.setdefault(p["type"], []).append(p)
    # the per-layer heat maps: one per routing decision, rows = layers
    layer_maps = [p for p in by_type["heatmap"] if "drllm_routing_decisions_total" in p["targets"][0]["expr"]]
    assert sorted(re.search(r'decision="(\w+)"', p["targets"][0]["expr"]).group(1) for p in layer_maps) == \
        ["execute", "repeat", "skip"]
    for p in layer_maps:
        assert p["targets"][0]["legendFormat"] == "{{layer}}" and p["options"]["calculate"] is False
    # layers executed per request as a distribution
    dist = [p for p in panels if p["type"] in ("heatmap", "bargauge")
            and "drllm_request_layers_executed_bucket" in p["targets"][0]["expr"]]
    assert dist and all(p["targets"][0]["format"] == "heatmap" for p in dist)
    # the list: requests/s, latency and TTFT percentiles, tokens/s, running/waiting
    joined = "\n".join(dashboard_exprs(dashboard))
    for needle in ("rate(drllm_requests_total", "drllm_e2e_request_latency_seconds_bucket",
                   "drllm_time_to_first_token_seconds_bucket", "rate(drllm_generation_tokens_total",
                   "rate(drllm_prompt_tokens_total", "drllm_num_requests_running", "drllm_num_requests_waiting"):
        assert needle in joined


def test_grafana_provisioning_matches_compose():
    ds = yaml.safe_load(DATASOURCES.read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = {_mount_target(v): v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    for provider in providers:
        host = mounts[provider["options"]["path"]]
        assert (ROOT / host / DASHBOARD.name).is_file()
    assert (ROOT / mounts["/etc/grafana/provisioning"]).resolve() == (GRAFANA / "provisioning").resolve()


# --- Prometheus ------------------------------------------------------------------------------------------------

def test_promtool_accepts_scrape_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; scripts/setup.sh --test installs it)")
    done = subprocess.run([promtool, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "drllm"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["drllm:8000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_json(url: str, timeout: float = 5.0, data: dict | None = None) -> dict:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


class _Prometheus:
    """A real Prometheus on loopback with a scratch TSDB; stopped on exit."""

    def __init__(self, config: dict, tmp_path: Path):
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus not installed (Debian package `prometheus`; scripts/setup.sh --test installs it)")
        self.dir = tmp_path / "prometheus"
        self.dir.mkdir()
        self.config = self.dir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = self.dir / "prometheus.log"
        self.cmd = [binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.dir / 'tsdb'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"]

    def __enter__(self) -> _Prometheus:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        pytest.fail(f"prometheus not ready after 30 s:\n{self.log.read_text()[-3000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def query(self, promql: str) -> dict:
        """Instant query through the HTTP API; returns the `data` object (raises on an error response)."""
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            out = _http_json(url)
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{promql}: HTTP {e.code}: {e.read().decode()[:500]}") from None
        assert out["status"] == "success", out
        return out["data"]

    def scalar(self, promql: str) -> float | None:
        """Value of a query returning at most one series (None when it returns none)."""
        result = self.query(promql)["result"]
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])


def test_prometheus_parses_every_dashboard_query(dashboard, tmp_path):
    """A real Prometheus evaluates each dashboard query (with Grafana's variables substituted): a syntax
    error is an HTTP 400 there."""
    config = {"global": {"scrape_interval": "15s"}, "scrape_configs": []}
    with _Prometheus(config, tmp_path) as prom:
        for expr in dashboard_exprs(dashboard):
            data = prom.query(grafana_to_promql(expr))
            assert data["resultType"] in ("vector", "scalar", "matrix"), expr
        for name in dashboard_variable_metrics(dashboard):
            prom.query(name)


# --- compose, Dockerfile, entry point ----------------------------------------------------------------------------

def test_docker_compose_config_accepts_compose_file(tmp_path):
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (Debian package `docker-compose`; scripts/setup.sh --test installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DRLLM_", "COMPOSE_", "GRAFANA_", "PROMETHEUS_"))}
    done = subprocess.run([binary, "--project-directory", str(ROOT), "-f", str(COMPOSE), "config"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    resolved = yaml.safe_load(done.stdout)
    services = resolved["services"]
    assert {"drllm", "drllm-cpu", "prometheus", "grafana"} <= set(services)
    drllm = services["drllm"]
    assert drllm["environment"]["DRLLM_MODEL"] == "default"
    assert any(str(p.get("target", p)).endswith("8000") if isinstance(p, dict) else p.endswith(":8000")
               for p in drllm["ports"])


def _mount_target(volume: str) -> str:
    """Container path of a short-syntax volume (`source:target[:mode]`; the source may hold `${VAR:-x}`)."""
    parts = volume.rsplit(":", 2)
    return parts[-2] if parts[-1] in ("ro", "rw", "z", "Z") else parts[-1]


def test_compose_file_contents():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    drllm = services["drllm"]
    assert drllm["ports"][0].endswith("8000}:8000")
    (device,) = drllm["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert drllm["restart"] in ("unless-stopped", "always", "on-failure")
    hc = drllm["healthcheck"]
    assert "/health" in " ".join(hc["test"])
    assert int(hc["start_period"].rstrip("s")) >= 300
    env = drllm["environment"]
    for var in ("DRLLM_MODEL", "DRLLM_ROUTERS", "DRLLM_API_KEY", "DRLLM_MAX_BATCH_SIZE", "HF_TOKEN"):
        assert var in env
    targets = {_mount_target(v) for v in drllm["volumes"]}
    assert {"/cache/base", "/cache/huggingface", "/models"} <= targets
    assert drllm["build"]["args"]["TORCH_VARIANT"] == "cuda"
    cpu = services["drllm-cpu"]
    assert cpu["build"]["args"]["TORCH_VARIANT"] == "cpu" and "deploy" not in cpu
    assert cpu["profiles"] == ["cpu"] and "drllm" in cpu["networks"]["default"]["aliases"]
    prom = services["prometheus"]
    assert any(v.startswith("./deploy/prometheus/prometheus.yml:") for v in prom["volumes"])
    assert any(_mount_target(v) == "/prometheus" for v in prom["volumes"])
    assert not prom["image"].endswith(":latest") and ":" in prom["image"]
    assert ":" in services["grafana"]["image"] and not services["grafana"]["image"].endswith(":latest")
    assert set(compose["volumes"]) >= {"drllm-weights", "hf-cache", "prometheus-data", "grafana-data"}


def test_compose_passes_every_server_variable_the_readme_lists():
    """README's Compose configuration table: each DRLLM_* server option it lists reaches the container."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Configuration", 1)[1].split("\n### ", 1)[0]
    listed = set()
    for line in section.splitlines():
        if line.startswith("| `DRLLM_"):
            listed |= set(re.findall(r"`(DRLLM_[A-Z_]+)`", line.split("|")[1]))
    host_side = {"DRLLM_MODELS_DIR", "DRLLM_PUBLISH_PORT"}  # Compose's own settings, not server options
    assert "DRLLM_PROFILES" in listed
    env = yaml.safe_load(COMPOSE.read_text())["services"]["drllm"]["environment"]
    assert sorted(listed - host_side - set(env)) == []


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile():
    ins = _dockerfile_instructions()
    args = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args.setdefault(k, v)
    cuda_base = args["CUDA_BASE_IMAGE"]
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime", cuda_base), cuda_base
    torch_version = cuda_base.split(":")[1].split("-")[0]
    pyproject = (ROOT / "pyproject.toml").read_text()
    spec = re.search(r'"torch>=([\d.]+),<([\d.]+)"', pyproject)
    lo, hi = (tuple(int(x) for x in v.split(".")) for v in spec.groups())
    assert lo <= tuple(int(x) for x in torch_version.split(".")) < hi
    assert args["TORCH_VARIANT"] == "cuda" and re.fullmatch(r"python:3\.1[1-9][\w.-]*", args["CPU_BASE_IMAGE"])
    froms = [rest for word, rest in ins if word == "FROM"]
    assert "base-${TORCH_VARIANT} AS deps" in froms
    words = [w for w, _ in ins]
    # dependencies are installed from pyproject.toml before the source is copied
    copy_pyproject = next(i for i, (w, r) in enumerate(ins) if w == "COPY" and r.startswith("pyproject.toml"))
    copy_source = next(i for i, (w, r) in enumerate(ins) if w == "COPY" and r.startswith(". "))
    install_deps = next(i for i, (w, r) in enumerate(ins) if w == "RUN" and "-r /tmp/requirements.txt" in r)
    assert copy_pyproject < install_deps < copy_source
    assert "torch-constraint" in ins[install_deps][1]
    assert ("EXPOSE", "8000") in ins
    users = [r for w, r in ins if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    (healthcheck,) = [r for w, r in ins if w == "HEALTHCHECK"]
    assert "/health" in healthcheck and "--start-period" in healthcheck
    entry = [r for w, r in ins if w == "ENTRYPOINT"][-1]
    assert json.loads(entry) == ["/app/deploy/docker-entrypoint.sh"]
    assert "exec drllm serve --host" in ENTRYPOINT.read_text()
    assert words.index("USER") > words.index("RUN")
    env = " ".join(r for w, r in ins if w == "ENV")
    for var in ("DRLLM_WEIGHTS_DIR=/app/weights", "DRLLM_BASE_CACHE=/cache/base", "HF_HOME=/cache/huggingface"):
        assert var in env


def test_dockerignore_keeps_caches_out_and_source_in():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for needed in (".git", ".venv", "weights/base", "**/__pycache__", "**/*.gguf", ".pytest_cache"):
        assert needed in patterns
    for kept in ("pyproject.toml", "README.md", "routing", "server", "cli", "weights/routers", "weights"):
        assert kept not in patterns
    assert "!deploy/docker-entrypoint.sh" in patterns and "!weights/routers/**" in patterns


def test_entrypoint_links_baked_model_and_execs_serve(tmp_path):
    baked = tmp_path / "baked"
    (baked / "SmolLM2-135M-Instruct").mkdir(parents=True)
    (baked / "SmolLM2-135M-Instruct" / "drllm_source.json").write_text("{}")
    cache = tmp_path / "cache" / "base"
    (cache / "mine-0123456789").mkdir(parents=True)  # a user's converted GGUF: left alone
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "drllm"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "DRLLM_BAKED_BASE": str(baked), "DRLLM_BASE_CACHE": str(cache)}
    for _ in range(2):  # idempotent: a restart finds the link already there
        done = subprocess.run(["sh", str(ENTRYPOINT), "--max-batch-size", "4"], capture_output=True, text=True,
                              env=env, timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["serve", "--host", "0.0.0.0", "--max-batch-size", "4"]
        link = cache / "SmolLM2-135M-Instruct"
        assert link.is_symlink() and link.resolve() == (baked / "SmolLM2-135M-Instruct").resolve()
        assert (link / "drllm_source.json").is_file()
        assert (cache / "mine-0123456789").is_dir() and not (cache / "mine-0123456789").is_symlink()
    # DRLLM_HOST still applies; a stale link (older image) is re-pointed
    link.unlink()
    link.symlink_to(tmp_path / "gone")
    done = subprocess.run(["sh", str(ENTRYPOINT)], capture_output=True, text=True,
                          env={**env, "DRLLM_HOST": "127.0.0.1"}, timeout=30)
    assert done.stdout.split() == ["serve", "--host", "127.0.0.1"]
    assert link.resolve() == (baked / "SmolLM2-135M-Instruct").resolve()
    assert os.access(ENTRYPOINT, os.X_OK)


# --- live server (server_url comes from tests/conftest.py) ---------------------------------------------------------

def _served_model(server_url: str) -> str:
    return _http_json(server_url + "/v1/models", timeout=30)["data"][0]["id"]


def _complete(server_url: str, n: int = 1, max_tokens: int = 8) -> None:
    model = _served_model(server_url)
    for i in range(n):
        out = _http_json(server_url + "/v1/completions", timeout=300,
                         data={"model": model, "prompt": f"Count to ten, attempt {i}: one, two,",
                               "max_tokens": max_tokens, "temperature": 0})
        assert out["choices"][0]["text"] is not None


def _scrape(server_url: str) -> str:
    with urllib.request.urlopen(server_url + "/metrics", timeout=30) as resp:
        return resp.read().decode()


def _exposition(text: str) -> tuple[dict[str, str], dict[str, float]]:
    """(# TYPE declarations name -> type, sample name -> sum of its values over all label sets)."""
    types, samples = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(None, 3)
            types[name] = typ.strip()
        elif line and not line.startswith("#"):
            m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(\S+)", line)
            if m:
                samples[m.group(1)] = samples.get(m.group(1), 0.0) + float(m.group(3))
    return types, samples


def _dashboard_gaps(dashboard: dict, text: str) -> tuple[list[str], list[str]]:
    """(series whose family /metrics does not declare, series declared but without samples)."""
    types, samples = _exposition(text)
    missing, no_samples = [], []
    for series in sorted(dashboard_series(dashboard)):
        family = family_of(series)
        kind = CONTRACT[family]
        if types.get(family) != kind:  # histograms: declared by family name; counters: by the _total name
            missing.append(f"{series} ({kind} {family})")
        elif series not in samples and family != "drllm_request_budget":
            # drllm_request_budget is only observed for requests that ask for a budget
            no_samples.append(series)
    return missing, no_samples


@pytest.mark.live_server
def test_dashboard_metrics_in_live_scrape(server_url, dashboard):
    _complete(server_url, n=1, max_tokens=8)
    text = _scrape(server_url)  # the engine records a request's metrics before its response is sent
    missing, no_samples = _dashboard_gaps(dashboard, text)
    _, samples = _exposition(text)
    assert not missing, f"dashboard metrics absent from /metrics: {missing}"
    assert not no_samples, f"dashboard metrics without samples after a completion: {no_samples}"
    assert samples["drllm_request_layers_executed_count"] >= 1
    assert samples["drllm_routing_decisions_total"] >= 1


@pytest.mark.live_server
def test_prometheus_scrapes_layer_metrics_from_server(server_url, tmp_path):
    """The repo's scrape config, pointed at the local server, through a real Prometheus: the layer-count
    metrics arrive and agree with what the server exposes."""
    target = urllib.parse.urlsplit(server_url).netloc
    config = yaml.safe_load(PROM_CONFIG.read_text())
    config["global"].update({"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"})
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "drllm"]
    job["static_configs"] = [{"targets": [target], "labels": job["static_configs"][0].get("labels", {})}]
    config["scrape_configs"] = [job]
    with _Prometheus(config, tmp_path) as prom:
        _, before = _exposition(_scrape(server_url))
        _complete(server_url, n=3, max_tokens=6)
        deadline = time.monotonic() + 60
        while True:
            # the server's own numbers (re-read: a finishing request may still be counted) against Prometheus'
            _, direct = _exposition(_scrape(server_url))
            want = (1.0, direct["drllm_request_layers_executed_count"], direct["drllm_routing_decisions_total"])
            got = (prom.scalar('max(up{job="drllm"})'),
                   prom.scalar("sum(drllm_request_layers_executed_count)"),
                   prom.scalar("sum(drllm_routing_decisions_total)"))
            counted = want[1] >= before.get("drllm_request_layers_executed_count", 0.0) + 3
            if (got == want and counted) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert got == want, f"prometheus (up, count, decisions) = {got}, server: {want}\n{prom.log.read_text()[-2000:]}"
        assert want[1] >= before.get("drllm_request_layers_executed_count", 0.0) + 3
        assert want[2] > before.get("drllm_routing_decisions_total", 0.0)
        # the per-layer series the heat map is built from are there, labelled by layer and decision
        series = prom.query("sum by (layer, decision) (drllm_routing_decisions_total)")["result"]
        assert series and all({"layer", "decision"} <= set(s["metric"]) for s in series)
        assert {s["metric"]["decision"] for s in series} <= {"skip", "execute", "repeat"}
        mean = prom.scalar("sum(drllm_request_layers_executed_sum) / sum(drllm_request_layers_executed_count)")
        assert mean is not None and mean > 0
