"""From one machine to many: the server bundle's deploy/ folder.

  deploy/kserve-inferenceservice.yaml  a KServe InferenceService (serving.kserve.io/v1beta1) whose
                                       predictor is Triton (modelFormat triton, the
                                       kserve-tritonserver ClusterServingRuntime, protocol v2)
                                       reading the bundle's model_repository/ from storageUri and
                                       exposing Triton's gRPC port (h2c 9000), one replica
  deploy/gru-deploy-serve.yaml         a plain Deployment (one replica, Recreate) + Service running
                                       `gru-deploy serve` on the bundle (REST and gRPC), with
                                       liveness and readiness probes on the v2 health endpoints
  deploy/Dockerfile                    the image that Deployment runs: gru-deploy and this bundle,
                                       on a base image pinned by digest, with the onnxruntime this
                                       bundle was verified with and without torch

Both pods are admissible under the *restricted* Pod Security Standard. Both run one replica:
KServe and a Kubernetes Service route each request on its own, and a stateful sequence's hidden
state lives in one server process, so every chunk of a sequence must reach the same replica
(docs/serving.md, "Kubernetes", says why ClientIP affinity and hashing do not do that here).

Written with PyYAML from dicts; the values that matter (ports, paths, names, the serve command
line) come from one place here, so the probes, the container ports, the Service and the
command line cannot disagree. tests/test_deploy.py checks the files with the real schemas
(kubernetes-validate, KServe's CRD) and hadolint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

HTTP_PORT, GRPC_PORT = 8000, 8001
# kserve-tritonserver starts tritonserver with --grpc-port=9000; KServe (Knative) routes gRPC to
# the one container port it is given, which must be named h2c (KServe's Triton docs)
TRITON_GRPC_PORT = 9000
TRITON_USER = 1000  # the Triton image's non-root user, as the kserve-tritonserver runtime runs it
SERVE_USER = 65532  # the Deployment's non-root user (numeric: runAsNonRoot can check it)
BUNDLE_IN_IMAGE = "/bundle"
KSERVE_RUNTIME = "kserve-tritonserver"  # KServe's ClusterServingRuntime for Triton (its supportedModelTypes: triton)
# python:3.11.16-slim-bookworm, pinned by the digest of its multi-platform image index as the
# Docker official images record it (github.com/docker-library/repo-info,
# repos/python/remote/3.11.16-slim-bookworm.md at commit 422f3cfe488dc9ae394c5058b27db617f72c91db).
# No registry is reachable from where this was written: the digest was not pulled here.
BASE_IMAGE = ("python:3.11.16-slim-bookworm"
              "@sha256:c425d915a89a6dcd3183b1797ad9bd8878caff5a417f6371c8df93c8ea8b727f")
# gru-deploy's own requirements that `serve` never imports (export-time only); the image leaves
# them out. tests/test_deploy.py runs `serve` with these imports blocked.
NOT_FOR_SERVING = ("torch", "onnxscript")
FILES = {"kserve": "deploy/kserve-inferenceservice.yaml", "kubernetes": "deploy/gru-deploy-serve.yaml",
         "dockerfile": "deploy/Dockerfile"}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
RUNTIME_DEFAULT_SECCOMP = {"type": "RuntimeDefault"}


@dataclass(frozen=True)
class Deploy:
    """Where the cluster finds the bundle: storage_uri, the model repository for KServe (None:
    a PVC path named after the model); image, the `gru-deploy serve` image (None: built from
    deploy/Dockerfile, tagged with gru-deploy's version)."""

    storage_uri: str | None = None
    image: str | None = None


def resource_name(model_name: str) -> str:
    """A Kubernetes object name (DNS-1123 label) from the model's name."""
    name = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")[:63].strip("-")
    return name or "gru-deploy"


def serve_args(model_name: str) -> list[str]:
    return ["serve", BUNDLE_IN_IMAGE, "--host", "0.0.0.0", "--port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT),
            "--model-name", model_name]


def wheel_name(version: str) -> str:
    """The file name of gru-deploy's pure-Python wheel at `version` (PEP 427)."""
    return f"gru_deploy-{version}-py3-none-any.whl"


def serving_requirements(versions: dict[str, str]) -> list[str]:
    """What `gru-deploy serve` needs, pinned: gru-deploy's installed requirements (core and the
    `serve` extra) less NOT_FOR_SERVING, each at the version `versions` records (the manifest's
    record: onnxruntime, onnx, numpy) or else the version installed here, which made the bundle."""
    from importlib import metadata

    from gru_deploy.errors import UserInputError

    try:
        requires = metadata.requires("gru-deploy") or []
    except metadata.PackageNotFoundError:
        raise UserInputError("gru-deploy is not installed (pip install -e .): its requirements, which "
                             "deploy/Dockerfile pins, come from its metadata") from None
    pinned: dict[str, str] = {}
    for requirement in requires:
        spec, _, marker = requirement.partition(";")
        if marker.strip() and marker.replace("'", '"').replace(" ", "") != 'extra=="serve"':
            continue
        name = re.match(r"[A-Za-z0-9._-]+(\[[^\]]*\])?", spec.strip()).group(0)
        base = re.sub(r"\[.*", "", name).lower()
        if base in NOT_FOR_SERVING:
            continue
        version = versions.get(base) or metadata.version(base)
        pinned[base] = f"{name}=={version.split('+')[0]}"
    return [pinned[name] for name in sorted(pinned)]


def deploy_files(model_name: str, deploy: Deploy, files: dict[str, bytes]) -> dict[str, Any]:
    """Add the deploy/ files of a server bundle whose Triton repository serves `model_name` to
    `files` (every other file of the bundle already there); the manifest's record of them."""
    import yaml

    from gru_deploy.bundle.parts import REPOSITORY
    from gru_deploy.versions import __version__, library_versions

    name = resource_name(model_name)
    storage_uri = deploy.storage_uri or f"pvc://gru-deploy-models/{name}/{REPOSITORY}"
    image = deploy.image or f"gru-deploy-serve:{__version__}"
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "inference",
              "app.kubernetes.io/managed-by": "gru-deploy"}
    # library_versions() is what the manifest records as "versions", in this same process
    requirements = serving_requirements(library_versions())
    bundle_entries = sorted({path.split("/")[0] for path in [*files, *FILES.values(), "manifest.json"]})

    def dump(header: str, *documents: dict[str, Any]) -> bytes:
        return (header + yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=False)).encode()

    files.update({
        FILES["kserve"]: dump(KSERVE_HEADER, _inference_service(name, labels, storage_uri)),
        FILES["kubernetes"]: dump(DEPLOYMENT_HEADER, *_deployment_and_service(name, labels, image, model_name)),
        FILES["dockerfile"]: _dockerfile(__version__, requirements, bundle_entries, model_name).encode(),
    })
    return {
        "kserve": {"file": FILES["kserve"], "runtime": KSERVE_RUNTIME, "storage_uri": storage_uri,
                   "protocol": "v2", "grpc_port": TRITON_GRPC_PORT, "replicas": 1},
        "kubernetes": {"file": FILES["kubernetes"], "image": image, "name": name,
                       "ports": {"http": HTTP_PORT, "grpc": GRPC_PORT}, "replicas": 1,
                       "dockerfile": FILES["dockerfile"],
                       "image_build": {"base": BASE_IMAGE, "wheel": f"wheels/{wheel_name(__version__)}",
                                       "requirements": requirements}},
    }


def _inference_service(name: str, labels: dict[str, str], storage_uri: str) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {"predictor": {
            # one Triton: its sequence batcher keeps each sequence's state in that process
            "minReplicas": 1, "maxReplicas": 1,
            "securityContext": {"runAsNonRoot": True, "seccompProfile": dict(RUNTIME_DEFAULT_SECCOMP)},
            "model": {
                "modelFormat": {"name": "triton"},
                "runtime": KSERVE_RUNTIME,
                "protocolVersion": "v2",
                "storageUri": storage_uri,  # the folder holding model_repository/'s model folders
                "ports": [{"name": "h2c", "containerPort": TRITON_GRPC_PORT, "protocol": "TCP"}],
                "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
                "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}},
                "securityContext": {**RESTRICTED_CONTAINER, "runAsNonRoot": True, "runAsUser": TRITON_USER},
            },
        }},
    }


def _deployment_and_service(name: str, labels: dict[str, str], image: str,
                            model_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures}

    container = {
        "name": "gru-deploy-serve",
        "image": image,
        "command": ["gru-deploy"],
        "args": serve_args(model_name),
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                  {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"}],
        "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
        "startupProbe": probe("/v2/health/ready", 2, 60),  # loading and checking the models: up to 2 min
        "readinessProbe": probe("/v2/health/ready", 5, 3),
        "livenessProbe": probe("/v2/health/live", 10, 3),
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "securityContext": {**RESTRICTED_CONTAINER, "readOnlyRootFilesystem": True},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {
            # one replica, replaced (not rolled): a sequence's state lives in one process
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {"metadata": {"labels": dict(labels)},
                         "spec": {"automountServiceAccountToken": False,
                                  "securityContext": {"runAsNonRoot": True, "runAsUser": SERVE_USER,
                                                      "runAsGroup": SERVE_USER,
                                                      "seccompProfile": dict(RUNTIME_DEFAULT_SECCOMP)},
                                  "terminationGracePeriodSeconds": 30, "containers": [container],
                                  "volumes": [{"name": "tmp", "emptyDir": {}}]}},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {
            "selector": {"app.kubernetes.io/name": name},
            "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                      {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP",
                       "appProtocol": "kubernetes.io/h2c"}],
        },
    }
    return deployment, service


KSERVE_HEADER = """\
# Triton under KServe, serving this bundle's model_repository/ (uploaded to storageUri).
# gRPC: KServe exposes one port of the predictor; this one is Triton's gRPC port (h2c 9000).
# For REST instead, delete `ports` (KServe then exposes Triton's HTTP port, 8080).
# One replica: KServe routes each request on its own, and Triton's sequence batcher keeps a
# sequence's state in one process, so every request of a sequence must reach that replica.
"""

DEPLOYMENT_HEADER = """\
# `gru-deploy serve` on this bundle: REST on 8000, gRPC on 8001 (image: deploy/Dockerfile).
# One replica, replaced with Recreate: a Service routes each request (or gRPC channel) on its
# own, and a sequence's state lives in one process, so every chunk of a sequence must reach
# it. For stateless models only, raise replicas and use RollingUpdate.
"""


def _dockerfile(version: str, requirements: list[str], bundle_entries: list[str], model_name: str) -> str:
    wheel = wheel_name(version)
    install = " \\\n        ".join(f'"{r}"' for r in requirements)
    copies = "\n".join(f"COPY --chown={SERVE_USER}:{SERVE_USER} {entry} {BUNDLE_IN_IMAGE}/{entry}"
                       for entry in bundle_entries)
    return f"""\
# The image deploy/gru-deploy-serve.yaml runs: gru-deploy and this bundle, serving REST on {HTTP_PORT}
# and gRPC on {GRPC_PORT}. Build it from the bundle folder (the one holding manifest.json), with
# gru-deploy {version}'s wheel put into it as wheels/{wheel}:
#   pip wheel --no-deps -w <bundle>/wheels <gru-deploy checkout>
#   docker build -f deploy/Dockerfile -t gru-deploy-serve:{version} <bundle>
# The build fails when that wheel is missing (it is never looked up in an index). wheels/ is not
# copied into {BUNDLE_IN_IMAGE}: serve refuses a bundle holding files its manifest does not list.
# Base: python:3.11.16-slim-bookworm pinned by its image index digest (docker-library/repo-info).
# Installed: what `serve` imports, at the versions this bundle was made and verified with
# (manifest.json: versions, deploy.kubernetes.image_build); not torch, which serving never loads.
FROM {BASE_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN pip install --no-cache-dir \\
        {install}
COPY wheels/{wheel} /tmp/wheels/{wheel}
RUN pip install --no-cache-dir --no-index --no-deps /tmp/wheels/{wheel} \\
    && rm -rf /tmp/wheels
{copies}
USER {SERVE_USER}:{SERVE_USER}
EXPOSE {HTTP_PORT} {GRPC_PORT}
ENTRYPOINT ["gru-deploy"]
CMD [{json.dumps(serve_args(model_name))[1:-1]}]
"""
