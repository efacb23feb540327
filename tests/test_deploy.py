"""The Kubernetes manifests in deploy/kubernetes, checked without a cluster.

Each document is validated, strictly (no unknown field), against the API schemas of the oldest
and newest Kubernetes versions kubernetes-validate ships; then what the schemas cannot know:
every `tasklane` command parses with the real CLI parser, the probes are the right ones, the
settings are valid, the grace periods agree and the image's init stays PID 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from tests.support.deployment import ROOT_PATH, dockerfile_instructions, settings_variables
from worker.cli import build_parser
from worker.config import Settings
from worker.health import CHECK_TIMEOUT_SECONDS
from worker.liveness import STALE_AFTER_SECONDS

MANIFESTS = ROOT_PATH / "deploy" / "kubernetes"
FILES = sorted(MANIFESTS.glob("*.yaml"))
VERSIONS = sorted({all_versions()[0], all_versions()[-1]})
# Secret keys the manifests mount, as compose names its secrets (one vocabulary).
SECRET_KEYS = {"database_url", "redis_url"}


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in FILES:
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((f"{path.name}:{document['kind']}", document))
    return found


def by_kind(kind: str) -> dict[str, Any]:
    [document] = [d for _, d in documents() if d["kind"] == kind]
    return document


def pod_spec(document: dict[str, Any]) -> dict[str, Any]:
    spec = document["spec"]
    if document["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]  # type: ignore[no-any-return]


def workloads() -> list[tuple[str, dict[str, Any]]]:
    return [(n, d) for n, d in documents() if d["kind"] in {"Deployment", "Job", "CronJob"}]


def config_map() -> dict[str, str]:
    return by_kind("ConfigMap")["data"]  # type: ignore[no-any-return]


def test_the_manifests_are_there() -> None:
    kinds = {d["kind"] for _, d in documents()}
    assert kinds == {"ConfigMap", "Deployment", "Job", "CronJob"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("name", "document"), documents(), ids=[n for n, _ in documents()])
def test_each_manifest_is_valid_for_kubernetes(
    name: str, document: dict[str, Any], version: str
) -> None:
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path)
        pytest.fail(f"{name} is not valid for Kubernetes {version} at {path}: {exc.message}")


@pytest.mark.parametrize(("name", "document"), workloads(), ids=[n for n, _ in workloads()])
def test_workloads_run_tasklane_commands_under_the_images_init(
    name: str, document: dict[str, Any]
) -> None:
    parser = build_parser()
    [container] = pod_spec(document)["containers"]
    # `command` would replace the image's ENTRYPOINT (tini); `args` replaces only its CMD.
    assert "command" not in container, f"{name}: use args, keep the image's init as PID 1"
    assert container["args"][0] == "tasklane"
    parser.parse_args(container["args"][1:])  # exits (failing the test) on a bad command
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in container:
            command = container[probe]["exec"]["command"]
            assert command[0] == "tasklane"
            parser.parse_args(command[1:])


@pytest.mark.parametrize(("name", "document"), workloads(), ids=[n for n, _ in workloads()])
def test_workloads_get_valid_settings_and_their_urls_as_files(
    name: str, document: dict[str, Any], tmp_path: Path
) -> None:
    spec = pod_spec(document)
    [container] = spec["containers"]
    assert [e["configMapRef"]["name"] for e in container["envFrom"]] == ["tasklane"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert "DATABASE_URL" not in env
    assert "REDIS_URL" not in env
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "secrets"]
    [volume] = [v for v in spec["volumes"] if v["name"] == "secrets"]
    assert mount["readOnly"] is True
    assert volume["secret"]["secretName"] == "tasklane"
    files = {env["DATABASE_URL_FILE"], env["REDIS_URL_FILE"]}
    assert files == {f"{mount['mountPath']}/{key}" for key in SECRET_KEYS}
    # The settings the pod starts with are valid (the URLs as the secret would hold them).
    local = {}
    for variable in ("DATABASE_URL_FILE", "REDIS_URL_FILE"):
        path = tmp_path / Path(env[variable]).name
        scheme = "postgresql://app:pw@db:5432/tasklane" if "DATABASE" in variable else "redis://r"
        path.write_text(scheme)
        local[variable] = str(path)
    Settings.from_env({**config_map(), **local})


def test_the_config_map_names_only_settings_tasklane_reads() -> None:
    unknown = set(config_map()) - settings_variables()
    assert not unknown, f"not tasklane settings (typos?): {sorted(unknown)}"


def test_the_worker_probes_split_liveness_from_readiness() -> None:
    [container] = pod_spec(by_kind("Deployment"))["containers"]
    live, ready, startup = (
        container["livenessProbe"],
        container["readinessProbe"],
        container["startupProbe"],
    )
    assert live["exec"]["command"] == ["tasklane", "health", "--live"]
    assert startup["exec"]["command"] == ["tasklane", "health", "--live"]
    assert ready["exec"]["command"] == ["tasklane", "health", "--local"]
    # Readiness's four checks each give up after CHECK_TIMEOUT_SECONDS: it must be let finish.
    assert ready["timeoutSeconds"] > 4 * CHECK_TIMEOUT_SECONDS
    # A restart needs the stamp stale for longer than one slow probe could explain.
    assert live["periodSeconds"] * live["failureThreshold"] >= STALE_AFTER_SECONDS


def test_termination_grace_outlasts_the_shutdown_grace() -> None:
    """Kubernetes must not SIGKILL a worker that is still handing its runs back."""
    grace = float(config_map()["TASKLANE_SHUTDOWN_GRACE_SECONDS"])
    spec = pod_spec(by_kind("Deployment"))
    assert spec["terminationGracePeriodSeconds"] >= grace + 20


def test_a_read_only_root_keeps_the_liveness_stamp_writable() -> None:
    spec = pod_spec(by_kind("Deployment"))
    [container] = spec["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    stamp = Path(config_map().get("TASKLANE_LIVENESS_PATH", Settings().liveness_path))
    mounts = {Path(m["mountPath"]) for m in container["volumeMounts"] if not m.get("readOnly")}
    assert stamp.parent in mounts, f"{stamp} is on the read-only root"


def test_every_workload_runs_the_same_image() -> None:
    images = {pod_spec(d)["containers"][0]["image"] for _, d in workloads()}
    assert len(images) == 1, images


def test_the_readme_shows_the_derived_image_example_as_it_is() -> None:
    """tests/test_install.py runs examples/derived-image; the README must show that file."""
    readme = (ROOT_PATH / "README.md").read_text()
    shown = dockerfile_instructions(readme.split("```dockerfile\n", 1)[1].split("```", 1)[0])
    example = dockerfile_instructions(ROOT_PATH / "examples/derived-image/Dockerfile")
    assert shown[0][0] == "FROM"
    assert shown[1:] == [(word, args) for word, args in example if word not in {"ARG", "FROM"}]
