"""The edge bundle's web page (web/index.html + web/app.js) in a real browser: Debian's
Chromium, headless, driven by playwright-core (examples/browser/check_page.mjs; no browser is
downloaded). The bundle folder is served on a loopback port with onnxruntime-web's dist/
(installed with `npm install --ignore-scripts` into ~/.cache/gru-deploy/browser-example,
GRU_DEPLOY_CACHE moves it) at web/ort/, where the page looks by default, and at /ort-dist/
for the `?ort=` parameter. The page runs model.onnx in onnxruntime-web's WASM backend on the
first golden classifier case; the test checks its verdict, the label and the bars, and the
screenshot's pixels.

Chromium runs with --no-sandbox: as root (CI containers) its sandbox refuses to start.
Measured here (2 cores): install about 4 s, each page about 2 s; max abs error of the WASM
logits vs eager PyTorch 8.9e-7 (the page's tolerance is 1e-4).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from examples_helpers import EXAMPLES, npm_folder, require_tools
from gru_deploy.bundle.read import verify_bundle
from gru_deploy.bundle.package import package, web_files

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
PAGE_TOL = 1e-4
BAR_BLUE = (0x2F, 0x6F, 0xDB)  # the predicted class's bar in app.js

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser_example() -> Path:
    require_tools(CHROMIUM)
    return npm_folder("browser-example", EXAMPLES / "browser")


@pytest.fixture(scope="module")
def edge_bundle(export_dir, tmp_path_factory) -> Path:
    out, _ = package(export_dir, "edge", out=tmp_path_factory.mktemp("browser") / "edge")
    return out


class Handler(SimpleHTTPRequestHandler):
    """The bundle folder, with onnxruntime-web's dist/ mounted at /web/ort/ and /ort-dist/."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json"}

    def __init__(self, *args, bundle: Path, dist: Path, **kwargs):
        self.bundle, self.dist = bundle, dist
        super().__init__(*args, directory=str(bundle), **kwargs)

    def translate_path(self, path: str) -> str:
        for mount in ("/web/ort/", "/ort-dist/"):
            if path.startswith(mount):
                name = path[len(mount):].split("?", 1)[0].split("#", 1)[0]
                if "/" in name or name.startswith("."):
                    return str(self.dist / "missing")
                return str(self.dist / name)
        return super().translate_path(path)

    def log_message(self, format, *args):  # noqa: A002 - keep the test output quiet
        pass


@pytest.fixture(scope="module")
def server(browser_example, edge_bundle):
    dist = browser_example / "node_modules" / "onnxruntime-web" / "dist"
    assert (dist / "ort.min.js").is_file()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, bundle=edge_bundle, dist=dist))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def open_page(browser_example: Path, url: str, shot: Path) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run(["node", "check_page.mjs", url, str(shot), "60000"], cwd=browser_example,
                          capture_output=True, text=True, timeout=180, env={**os.environ, "CHROMIUM": CHROMIUM})
    print(proc.stdout, proc.stderr[-3000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, json.loads(lines[-1]) if lines else {}


def blue_pixels(png: Path) -> int:
    from matplotlib.image import imread

    pixels = (imread(png)[..., :3] * 255).round().astype(int)
    return int(np.all(np.abs(pixels - np.array(BAR_BLUE)) <= 3, axis=-1).sum())


def test_the_edge_bundle_ships_the_page_but_not_onnxruntime_web(edge_bundle):
    manifest = json.loads((edge_bundle / "manifest.json").read_text())
    assert set(web_files()) <= set(manifest["files"])
    assert not [p for p in manifest["files"] if p.endswith((".wasm", ".mjs")) or "ort.min" in p]
    assert './ort/ort.min.js' in (edge_bundle / "web" / "app.js").read_text()
    assert verify_bundle(edge_bundle)["passed"]


@pytest.mark.parametrize("query", ["", "?ort=/ort-dist/ort.min.js"], ids=["default-ort", "ort-param"])
def test_the_page_runs_the_golden_case_in_wasm(browser_example, edge_bundle, server, tmp_path, query):
    shot = tmp_path / "page.png"
    proc, page = open_page(browser_example, f"{server}/web/index.html{query}", shot)
    assert proc.returncode == 0 and page.get("status") == "match", page

    golden = json.loads((edge_bundle / "golden" / "golden.json").read_text())
    case = next(c for c in golden["cases"] if c["variant"] == "classifier")
    labels = json.loads((edge_bundle / "manifest.json").read_text())["labels"]
    classes = len(labels)
    want = np.asarray(case["outputs"]["logits"]["data"][:classes])
    assert page["case"] == case["name"] and page["tolerance"] == PAGE_TOL
    assert page["maxAbs"] <= PAGE_TOL
    np.testing.assert_allclose(page["logits"], want, atol=PAGE_TOL)
    assert page["label"] == labels[int(want.argmax())]
    assert page["labelText"].startswith(f"Predicted: {page['label']} (")
    assert page["verdict"].startswith("Matches the golden output") and "tolerance 1e-4" in page["verdict"]
    assert page["bars"] == classes and abs(sum(page["probabilities"]) - 1) < 1e-6
    assert "wasm backend" in page["statusLine"]

    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    # The predicted class's bar is drawn: a block of its blue, as wide as its probability.
    assert blue_pixels(shot) > 2_000 * max(page["probabilities"])


def test_a_missing_onnxruntime_web_is_reported_on_the_page(browser_example, server, tmp_path):
    proc, page = open_page(browser_example, f"{server}/web/index.html?ort=/nowhere/ort.min.js", tmp_path / "x.png")
    assert proc.returncode == 1 and page["status"] == "error"
    assert "cannot load onnxruntime-web from" in page["verdict"]


def test_the_page_runs_a_modules_per_step_golden_case(browser_example, tmp_path):
    """A module's edge bundle ships the same page: it feeds the case's inputs by name, checks
    every output, and draws the first output's last step for sample 0 (a per-step tagger)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from cli_helpers import run_cli
    from gru_deploy.bundle.package import package
    from test_lengths_hook import MODELS, _checkpoint

    out = tmp_path / "tagger"
    assert run_cli("export", "--model", f"{MODELS}:MaskedTagger", "--checkpoint",
                   str(_checkpoint("MaskedTagger", tmp_path)), "--out", str(out)).returncode == 0
    bundle, _ = package(out, "edge", out=tmp_path / "edge")
    dist = browser_example / "node_modules" / "onnxruntime-web" / "dist"
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, bundle=bundle, dist=dist))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        proc, page = open_page(browser_example, f"http://127.0.0.1:{httpd.server_address[1]}/web/index.html",
                               tmp_path / "page.png")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert proc.returncode == 0 and page.get("status") == "match", page
    golden = json.loads((bundle / "golden" / "golden.json").read_text())
    case = next(c for c in golden["cases"] if c["variant"] == "classifier")
    batch, seq, tags = case["outputs"]["logits"]["shape"]
    last_step = np.asarray(case["outputs"]["logits"]["data"]).reshape(batch, seq, tags)[0, -1]
    np.testing.assert_allclose(page["logits"], last_step, atol=PAGE_TOL)
    assert page["outputs"] == ["logits"] and page["errors"]["logits"] <= PAGE_TOL
    assert page["labelText"].startswith("Predicted at the last step: class ")
    assert page["bars"] == tags
