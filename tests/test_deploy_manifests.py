"""The deployment files, checked where no Docker engine and no Kubernetes run (issue 19):

- ``docker-compose.yml`` through Debian's ``docker-compose config`` (v1, which parses and
  interpolates a compose file without an engine; ``scripts/ensure-docker-compose.sh`` installs
  it), with ``.env.example``'s keys: it refuses to resolve while a secret is empty, publishes only
  the API and the MLflow UI and on 127.0.0.1 by default, reserves NVIDIA GPUs for the workers and
  scales them by replicas, has healthchecks, named volumes and pinned images;
- ``deploy/k8s/*.yaml``: RayCluster and RayJob against the KubeRay CRD's OpenAPI schema committed
  in ``deploy/k8s/crd-schemas/`` (strict: an unknown field is an error, as ``kubectl apply
  --validate=strict`` says), everything else against Kubernetes' own types
  (``kubernetes-validate``, strict); every Secret they read is one ``secrets.example.yaml``
  defines, with the key they read, and none carries a value;
- the Dockerfiles install pinned versions (``deploy/constraints.txt``) from pinned base images.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = K8S / "crd-schemas"
K8S_VERSION = "1.33.0"  # the Kubernetes whose types the manifests target
CRDS = {"RayCluster": "rayclusters.ray.io-v1.json", "RayJob": "rayjobs.ray.io-v1.json"}
SECRETS = {  # filled in for `docker-compose config`; never printed
    "POSTGRES_PASSWORD": "pg-secret-for-the-test",
    "MLFLOW_ADMIN_PASSWORD": "mlflow-secret-for-the-test",
    "RAY_AUTH_TOKEN": "ray-token-for-the-test",
}


# --- docker-compose ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose_bin() -> str:
    subprocess.run([str(ROOT / "scripts" / "ensure-docker-compose.sh")], check=False)
    found = shutil.which("docker-compose")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(
                "CI=true: docker-compose is not installed (scripts/ensure-docker-compose.sh)"
            )
        pytest.skip("docker-compose not installed: run scripts/ensure-docker-compose.sh as root")
    return found


def _env_file(tmp_path: Path, **values: str) -> Path:
    """``.env.example`` with ``values`` filled in (the keys must exist there)."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    keys = {ln.split("=", 1)[0] for ln in lines if "=" in ln and not ln.startswith("#")}
    assert set(values) <= keys, f"not in .env.example: {set(values) - keys}"
    out = [
        f"{ln.split('=', 1)[0]}={values[ln.split('=', 1)[0]]}"
        if "=" in ln and ln.split("=", 1)[0] in values
        else ln
        for ln in lines
    ]
    path = tmp_path / "test.env"
    path.write_text("\n".join(out) + "\n")
    return path


def _config(compose_bin: str, env_file: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(
        [
            compose_bin,
            "--project-directory",
            str(ROOT),
            "--env-file",
            str(env_file),
            "-f",
            str(ROOT / "docker-compose.yml"),
            "config",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_compose_refuses_to_resolve_without_the_secrets(compose_bin, tmp_path):
    done = _config(compose_bin, _env_file(tmp_path))  # .env.example as shipped: empty secrets
    assert done.returncode != 0
    assert "POSTGRES_PASSWORD" in done.stderr or "RAY_AUTH_TOKEN" in done.stderr, done.stderr


def test_compose_file_validates_and_publishes_only_the_api_and_mlflow_on_loopback(
    compose_bin, tmp_path
):
    done = _config(compose_bin, _env_file(tmp_path, **SECRETS, GPU_WORKERS="3"))
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    services = config["services"]
    assert set(services) == {"postgres", "mlflow", "ray-head", "ray-gpu-worker", "api"}

    published = {name: s.get("ports", []) for name, s in services.items() if s.get("ports")}
    assert set(published) == {"api", "mlflow"}
    for name, ports in published.items():
        for port in ports:  # v1 writes "127.0.0.1:8321:8321/tcp"
            text = port if isinstance(port, str) else f"{port['host_ip']}:{port['published']}"
            assert text.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"

    # secrets come from the env file, nowhere in the compose file itself
    raw = (ROOT / "docker-compose.yml").read_text()
    for value in SECRETS.values():
        assert value not in raw
    secret_settings = re.findall(r"^\s*\w*(?:PASSWORD|TOKEN)\w*:\s*(\S.*)$", raw, re.M)
    assert secret_settings and all(v.startswith("${") for v in secret_settings), secret_settings
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    for name in ("ray-head", "ray-gpu-worker", "api"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN"] == SECRETS["RAY_AUTH_TOKEN"]

    # GPU workers: NVIDIA devices reserved, scaled by replicas
    worker = services["ray-gpu-worker"]
    assert worker["deploy"]["replicas"] == 3
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]

    # healthchecks, named volumes, pinned images
    for name, s in services.items():
        assert s.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        image = s["image"]
        assert re.search(r":[0-9][\w.-]*$", image) and not image.endswith(":latest"), image
    assert {"pgdata", "mlartifacts", "shared"} <= set(config["volumes"])
    for name in ("ray-head", "ray-gpu-worker", "api"):  # every node sees the shared storage
        assert any(str(v).startswith("shared:/shared") for v in services[name]["volumes"])
    assert "--app-name=basic-auth" in services["mlflow"]["command"]
    assert "--serve-artifacts" in services["mlflow"]["command"]


# --- Dockerfiles -------------------------------------------------------------------------------
def test_dockerfiles_pin_their_base_images_and_packages():
    constraints = (ROOT / "deploy" / "constraints.txt").read_text().splitlines()
    pins = [ln for ln in constraints if ln.strip() and not ln.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][\w.]*", p) for p in pins), pins
    pinned = {p.split("==")[0].lower() for p in pins}
    assert {"torch", "ray", "mlflow", "peft", "bitsandbytes", "optuna"} <= pinned
    for name in ("Dockerfile.control", "Dockerfile.worker"):
        text = (ROOT / "deploy" / name).read_text()
        (base,) = re.findall(r"^FROM (\S+)", text, re.M)
        assert re.search(r":[0-9]", base) and "latest" not in base, base
        installs = re.findall(r"pip install [^\n]*", text)
        assert any("-c deploy/constraints.txt" in i for i in installs), name
        for spec in re.findall(r'"([A-Za-z0-9_.\-\[\]]+[<>=!~][^"]*)"', "\n".join(installs)):
            assert "==" in spec and not re.search(r"[<>~]", spec), f"{name}: {spec} not pinned"
    assert "bitsandbytes" not in (ROOT / "deploy" / "Dockerfile.control").read_text()
    assert "[gpu," in (ROOT / "deploy" / "Dockerfile.worker").read_text()


# --- Kubernetes --------------------------------------------------------------------------------
def _strict(schema: dict) -> dict:
    """The CRD schema as the API server's strict field validation reads it: an object with
    ``properties`` takes no other field unless it preserves unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def _crd_validator(kind: str):
    import jsonschema

    schema = json.loads((SCHEMAS / CRDS[kind]).read_text())
    return jsonschema.Draft7Validator(_strict(schema))


def _manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


def _crd_errors(doc: dict) -> list[str]:
    validator = _crd_validator(doc["kind"])
    return [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


def test_the_crd_schemas_are_kuberays_with_their_source_and_version():
    source = (SCHEMAS / "SOURCE.md").read_text()
    assert "github.com/ray-project/kuberay" in source and "v1.7.0" in source
    for kind, name in CRDS.items():
        schema = json.loads((SCHEMAS / name).read_text())
        assert {"apiVersion", "kind", "metadata", "spec", "status"} <= set(schema["properties"])
        assert name in source
        # the schema has the fields our manifests use, deep inside (the pod template)
        spec = schema["properties"]["spec"]["properties"]
        assert ("headGroupSpec" in spec) if kind == "RayCluster" else ("entrypoint" in spec)


def test_every_manifest_validates_against_kuberay_or_kubernetes_types():
    import kubernetes_validate

    docs = _manifests()
    kinds = {doc["kind"] for _, doc in docs}
    assert {"RayCluster", "RayJob", "Deployment", "StatefulSet", "Service", "Secret"} <= kinds
    for name, doc in docs:
        if doc["kind"] in CRDS:
            assert doc["apiVersion"] == "ray.io/v1", name
            errors = _crd_errors(doc)
            assert not errors, f"{name} {doc['kind']}: {errors[:5]}"
        else:
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{name} {doc['kind']} {doc['metadata']['name']}: {path}: {exc}")


def test_the_schema_check_catches_a_misspelt_field_and_a_wrong_type():
    (cluster,) = [d for _, d in _manifests() if d["kind"] == "RayCluster"]
    typo = copy.deepcopy(cluster)
    typo["spec"]["headGroupSpec"]["rayStartParam"] = typo["spec"]["headGroupSpec"].pop(
        "rayStartParams"
    )
    assert any("rayStartParam" in e for e in _crd_errors(typo))
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert any("maxReplicas" in e for e in _crd_errors(wrong))
    deep = copy.deepcopy(cluster)  # inside the pod template, from Kubernetes' types in the CRD
    deep["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    assert _crd_errors(deep)


def test_the_cluster_runs_with_token_auth_and_shared_storage_on_every_node():
    docs = dict(((d["kind"], d["metadata"]["name"]), d) for _, d in _manifests())
    cluster = docs[("RayCluster", "lorasweep")]
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": "lorasweep-ray-auth"}
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert "/shared" in mounts
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert "lorasweep-shared" in claims
    shared = docs[("PersistentVolumeClaim", "lorasweep-shared")]
    assert shared["spec"]["accessModes"] == ["ReadWriteMany"]
    gpu = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    job = docs[("RayJob", "lorasweep-sweep")]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "lorasweep"}
    assert "SIGINT" in job["spec"]["runtimeEnvYAML"]


def test_every_secret_read_is_defined_with_its_key_and_no_value_is_committed():
    docs = _manifests()
    secrets = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "Secret"}
    assert set(secrets) == {"lorasweep-secrets", "lorasweep-ray-auth"}
    for secret in secrets.values():
        assert all(v == "" for v in secret.get("stringData", {}).values())
        assert not secret.get("data")
    refs = []

    def walk(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                refs.append(node["secretKeyRef"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for name, doc in docs:
        if doc["kind"] != "Secret":
            walk(doc)
            text = yaml.safe_dump(doc)
            assert not re.search(r"postgresql[^\s]*://[^@\s/]*:[^@\s]*@", text), name  # no password
    assert refs
    for ref in refs:
        assert ref["key"] in secrets[ref["name"]]["stringData"], ref
