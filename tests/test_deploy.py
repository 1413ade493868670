"""The server bundle's deploy/ files: a KServe InferenceService (Triton) and a Kubernetes
Deployment + Service running `gru-deploy serve`. Parsed with PyYAML and checked field by field
against KServe's and Kubernetes' documented fields; the Deployment's own command line is run
against the bundle, and its probes' paths must answer 200 there."""

from __future__ import annotations

import json
import signal
import urllib.request

import pytest
import yaml

from cli_helpers import run_cli
from test_serve import free_port, start


@pytest.fixture(scope="module")
def bundle(export_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "server"
    proc = run_cli("package", str(export_dir), "--target", "server", "--out", str(out),
                   "--storage-uri", "s3://models/gru/model_repository", "--image", "registry.example/gru:1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def documents(path):
    with open(path) as handle:
        return list(yaml.safe_load_all(handle))


def test_the_inference_service_runs_the_repository_in_kserves_triton_runtime(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    record = manifest["deploy"]["kserve"]
    [isvc] = documents(bundle / record["file"])
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton"  # a supportedModelType of kserve-tritonserver
    assert model["runtime"] == record["runtime"] == "kserve-tritonserver"
    assert model["protocolVersion"] == "v2"
    assert model["storageUri"] == record["storage_uri"] == "s3://models/gru/model_repository"
    # what the storageUri must hold: the bundle's Triton repository, each model with its config
    repository = bundle / "model_repository"
    assert sorted(p.name for p in repository.iterdir()) == sorted(
        {path.split("/")[1] for path in manifest["models"]})
    assert all((p / "config.pbtxt").is_file() for p in repository.iterdir())
    name = isvc["metadata"]["name"]
    assert len(name) <= 63 and name.replace("-", "").isalnum() and name == name.lower()


def test_the_deployment_and_service_run_gru_deploy_serve_with_probes_on_the_v2_health_endpoints(bundle):
    from gru_deploy.cli import cli

    record = json.loads((bundle / "manifest.json").read_text())["deploy"]["kubernetes"]
    deployment, service = documents(bundle / record["file"])
    assert (deployment["apiVersion"], deployment["kind"]) == ("apps/v1", "Deployment")
    assert (service["apiVersion"], service["kind"]) == ("v1", "Service")
    pod = deployment["spec"]["template"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()  # the Deployment owns its pods
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()  # the Service reaches them
    [container] = pod["spec"]["containers"]
    assert container["image"] == record["image"] == "registry.example/gru:1"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == record["ports"]
    # the command line is one the real `serve` accepts, on exactly the container's ports
    assert container["command"] == ["gru-deploy"] and container["args"][0] == "serve"
    params = cli.commands["serve"].make_context("serve", list(container["args"][1:])).params
    assert (params["port"], params["grpc_port"]) == (ports["http"], ports["grpc"])
    assert params["host"] == "0.0.0.0"
    for kind, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live"),
                       ("startupProbe", "/v2/health/ready")):
        probe = container[kind]["httpGet"]
        assert probe["path"] == path and probe["port"] in ports
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]]
    assert service["spec"]["sessionAffinity"] == "ClientIP"  # a sequence's state lives in one replica
    dockerfile = (bundle / record["dockerfile"]).read_text()
    assert json.dumps(container["args"])[1:-1] in dockerfile  # the image runs the same line


def test_the_deployments_command_line_serves_the_bundle_and_its_probes_answer(bundle):
    """Run the Deployment's args (the bundle path and ports mapped to this machine) and fetch
    each probe's path from the REST port."""
    record = json.loads((bundle / "manifest.json").read_text())["deploy"]["kubernetes"]
    deployment, _ = documents(bundle / record["file"])
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args = list(container["args"][2:])  # after "serve /bundle"
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--grpc-port") + 1] = str(free_port())
    at = args.index("--port")  # start() gives its own free --port
    del args[at:at + 2]
    proc, _, url = start(bundle, *args)
    try:
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            with urllib.request.urlopen(url + container[kind]["httpGet"]["path"], timeout=5) as r:
                assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_deploy_options_are_for_the_server_target(export_dir, tmp_path):
    proc = run_cli("package", str(export_dir), "--target", "edge", "--out", str(tmp_path / "e"), "--image", "x:1")
    assert proc.returncode == 2 and "--target server" in proc.stderr
    assert not (tmp_path / "e").exists()
