"""From one machine to many: the server bundle's deploy/ folder.

  deploy/kserve-inferenceservice.yaml  a KServe InferenceService (serving.kserve.io/v1beta1) whose
                                       predictor is Triton (modelFormat triton, the
                                       kserve-tritonserver ClusterServingRuntime, protocol v2)
                                       reading the bundle's model_repository/ from storageUri
  deploy/gru-deploy-serve.yaml         a plain Deployment + Service running `gru-deploy serve` on
                                       the bundle (REST and gRPC), with liveness and readiness
                                       probes on the v2 health endpoints
  deploy/Dockerfile                    the image that Deployment runs: gru-deploy and this bundle

Written with PyYAML from dicts; the values that matter (ports, paths, names, the serve command
line) come from one place here, so the probes, the container ports, the Service and the
command line cannot disagree.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

HTTP_PORT, GRPC_PORT = 8000, 8001
BUNDLE_IN_IMAGE = "/bundle"
KSERVE_RUNTIME = "kserve-tritonserver"  # KServe's ClusterServingRuntime for Triton (its supportedModelTypes: triton)
FILES = {"kserve": "deploy/kserve-inferenceservice.yaml", "kubernetes": "deploy/gru-deploy-serve.yaml",
         "dockerfile": "deploy/Dockerfile"}


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


def deploy_files(model_name: str, deploy: Deploy, files: dict[str, bytes]) -> dict[str, Any]:
    """Add the deploy/ files of a server bundle whose Triton repository serves `model_name` to
    `files`; the manifest's record of them. The Dockerfile installs the torch this runs."""
    import yaml

    from gru_deploy import __version__
    from gru_deploy.bundle.package import REPOSITORY
    from gru_deploy.versions import library_versions

    versions = library_versions()

    name = resource_name(model_name)
    storage_uri = deploy.storage_uri or f"pvc://gru-deploy-models/{name}/{REPOSITORY}"
    image = deploy.image or f"gru-deploy-serve:{__version__}"
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "inference",
              "app.kubernetes.io/managed-by": "gru-deploy"}

    inference_service = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {"predictor": {"model": {
            "modelFormat": {"name": "triton"},
            "runtime": KSERVE_RUNTIME,
            "protocolVersion": "v2",
            "storageUri": storage_uri,  # the folder holding model_repository/'s model folders
            "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}},
        }}},
    }

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
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {"metadata": {"labels": dict(labels)},
                         "spec": {"terminationGracePeriodSeconds": 30, "containers": [container],
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
            # a sequence's state lives in one replica: keep each client on one
            "sessionAffinity": "ClientIP",
        },
    }
    dockerfile = DOCKERFILE.format(version=__version__, torch=versions.get("torch", "").split("+")[0],
                                   bundle=BUNDLE_IN_IMAGE, http=HTTP_PORT, grpc=GRPC_PORT,
                                   args=json.dumps(serve_args(model_name))[1:-1])

    def dump(*documents: dict[str, Any]) -> bytes:
        return yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=False).encode()

    files.update({FILES["kserve"]: dump(inference_service), FILES["kubernetes"]: dump(deployment, service),
                  FILES["dockerfile"]: dockerfile.encode()})
    return {
        "kserve": {"file": FILES["kserve"], "runtime": KSERVE_RUNTIME, "storage_uri": storage_uri,
                   "protocol": "v2"},
        "kubernetes": {"file": FILES["kubernetes"], "image": image, "name": name,
                       "ports": {"http": HTTP_PORT, "grpc": GRPC_PORT}, "dockerfile": FILES["dockerfile"]},
    }


DOCKERFILE = """\
# The image deploy/gru-deploy-serve.yaml runs: gru-deploy and this bundle, serving REST on {http}
# and gRPC on {grpc}. Build it from the bundle folder (the one holding manifest.json):
#   docker build -f deploy/Dockerfile -t gru-deploy-serve:{version} .
# GRU_DEPLOY is what pip installs: by default a wheel of gru-deploy {version} put into the
# bundle folder as wheels/ (pip wheel --no-deps -w <bundle>/wheels <gru-deploy checkout>), removed
# again after the install (serve refuses a bundle holding files its manifest does not list).
FROM python:3.11-slim
ARG GRU_DEPLOY="gru-deploy[serve]=={version}"
COPY . {bundle}
RUN pip install --no-cache-dir --find-links {bundle}/wheels \\
        --extra-index-url https://download.pytorch.org/whl/cpu "torch=={torch}" "$GRU_DEPLOY" \\
    && rm -rf {bundle}/wheels
USER 65532
EXPOSE {http} {grpc}
ENTRYPOINT ["gru-deploy"]
CMD [{args}]
"""
