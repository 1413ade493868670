"""Reading and verifying bundles (folders or .tar.gz archives) through their manifests.

An archive is inspected whole before anything is extracted: only regular files and
folders, only paths the manifest lists (plus the manifest), no absolute paths or `..`,
no links or devices, each member within its listed size — then extracted with tarfile's
`filter='data'` as a second line of defence. A folder gets the same checks: no extra,
missing, linked or changed file.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np

from gru_deploy.bundle.parts import BUNDLE_FORMAT, BUNDLE_VERSION, TARGETS
from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.manifest import check_file_entries, parse_manifest, safe_relative_name, sha256_file
from gru_deploy.spec import INPUT_NAME, STATE_IN, STATE_OUT

BUNDLE_FIELDS = ("format", "format_version", "target", "signatures", "config", "labels", "models", "golden", "files")
MAX_MANIFEST_BYTES = 4 << 20
MAX_MEMBER_BYTES = 512 << 20


def parse_bundle_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """Validate a bundle manifest's schema; UserInputError naming the problem."""
    manifest = parse_manifest(raw, f"{where}: manifest.json", BUNDLE_FORMAT, BUNDLE_VERSION, BUNDLE_FIELDS)
    if manifest["target"] not in TARGETS:
        raise UserInputError(f"{where}: unknown target {manifest['target']!r}")
    check_file_entries(manifest["files"], f"{where}: manifest.json", nested=True)
    if not isinstance(manifest["models"], dict) or not isinstance(manifest["golden"], dict):
        raise UserInputError(f"{where}: manifest.json 'models' and 'golden' must be objects")
    for name in list(manifest["models"]) + [manifest["golden"].get("file", "")]:
        if name not in manifest["files"]:
            raise UserInputError(f"{where}: manifest names {name!r} but does not list it in 'files'")
    return manifest


GZIP_MAGIC = b"\x1f\x8b"


def is_bundle(path: Path) -> bool:
    """A gzip file (a bundle archive, perhaps corrupt), or a folder whose manifest says it is a
    bundle. Any other file is neither an export folder nor a bundle: UserInputError."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as handle:
            if handle.read(2) == GZIP_MAGIC:
                return True
        raise UserInputError(f"{path}: not an export folder or a bundle (a folder from `gru-deploy export`, or a "
                             "folder or .tar.gz from `gru-deploy package`)")
    manifest = path / "manifest.json"
    if path.is_dir() and manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
        except (ValueError, UnicodeDecodeError):
            return False
        return isinstance(data, dict) and data.get("format") == BUNDLE_FORMAT
    return False


@contextmanager
def open_bundle(path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield (folder, manifest) for a bundle folder or a safely extracted .tar.gz."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: no such bundle (a folder or .tar.gz from `gru-deploy package`)")
    if path.is_dir():
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise UserInputError(f"{path}: no manifest.json; not a gru-deploy bundle")
        yield path, parse_bundle_manifest(manifest_path.read_bytes(), str(path))
        return
    with tempfile.TemporaryDirectory(prefix="gru-deploy-bundle-") as tmp:
        yield _extract(path, Path(tmp))


def _extract(archive: Path, dest: Path) -> tuple[Path, dict[str, Any]]:
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            members = tar.getmembers()  # reads the whole archive: a truncated one fails here
            tops = {PurePosixPath(m.name).parts[0] for m in members if m.name}
            if len(tops) != 1:
                raise CheckFailed(f"{archive}: an archive must hold one top folder, found {sorted(tops)[:5]}")
            top = tops.pop()
            by_name = {}
            for member in members:
                if not safe_relative_name(member.name, nested=True):
                    raise CheckFailed(f"{archive}: member {member.name!r} has an absolute or '..' path; refusing it")
                if not (member.isfile() or member.isdir()):
                    raise CheckFailed(f"{archive}: member {member.name!r} is a link or special file; refusing it")
                if member.name in by_name:
                    raise CheckFailed(f"{archive}: member {member.name!r} appears twice")
                by_name[member.name] = member
            manifest_member = by_name.get(f"{top}/manifest.json")
            if manifest_member is None or not manifest_member.isfile():
                raise UserInputError(f"{archive}: no {top}/manifest.json; not a gru-deploy bundle")
            if manifest_member.size > MAX_MANIFEST_BYTES:
                raise CheckFailed(f"{archive}: manifest.json is {manifest_member.size} bytes; refusing it")
            handle = tar.extractfile(manifest_member)
            manifest = parse_bundle_manifest(handle.read() if handle else b"", str(archive))
            listed = {f"{top}/{name}": entry["size"] for name, entry in manifest["files"].items()}
            folders = {top} | {str(p) for name in listed for p in PurePosixPath(name).parents if str(p) != "."}
            for name, member in by_name.items():
                if member.isdir():
                    if name not in folders:
                        raise CheckFailed(f"{archive}: folder {name!r} is not part of the bundle")
                elif name != manifest_member.name:
                    if name not in listed:
                        raise CheckFailed(f"{archive}: extra file {name!r} is not listed in the manifest")
                    if member.size != listed[name] or member.size > MAX_MEMBER_BYTES:
                        raise CheckFailed(f"{archive}: {name!r} is {member.size} bytes, the manifest says "
                                          f"{listed[name]}")
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CheckFailed(f"{archive}: not a readable .tar.gz ({str(exc).splitlines()[0][:200]}); "
                          "it may be truncated or corrupt") from None
    return dest / top, manifest


def check_bundle_files(folder: Path, manifest: dict[str, Any]) -> None:
    """No missing, extra, linked or changed file: every sha256 and size as listed."""
    listed = set(manifest["files"]) | {"manifest.json"}
    present = set()
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise CheckFailed(f"{folder}: {rel} is a symbolic link; bundles hold regular files only")
        if path.is_file():
            present.add(rel)
    extra = sorted(present - listed)
    if extra:
        raise CheckFailed(f"{folder}: extra file(s) not in the manifest: {extra[:5]}")
    missing = sorted(listed - present)
    if missing:
        raise CheckFailed(f"{folder}: file(s) listed in the manifest are missing: {missing[:5]}")
    for name, entry in manifest["files"].items():
        path = folder / name
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise CheckFailed(f"{folder}: {name} does not match its sha256 in the manifest; changed or corrupted")


def _golden_feed(case: dict[str, Any], folder: Path, kind: str) -> dict[str, np.ndarray]:
    out = {}
    for name, tensor in case[kind].items():
        array = np.load(folder / tensor["npy"], allow_pickle=False)
        from_json = np.asarray(tensor["data"], dtype=tensor["dtype"]).reshape(tensor["shape"])
        if not np.array_equal(array, from_json):
            raise CheckFailed(f"{folder}: golden {case['name']} {name}: the .npy and JSON copies differ")
        out[name] = array
    return out


# A TorchScript archive carries Python-like code and unpickling its constants can call arbitrary
# functions: loading a received model.pt (torch.jit.load) runs the sender's program.
TORCHSCRIPT_NOT_RUN = ("not loaded: TorchScript runs code from the file (torch.jit.load); its sha256 matches the "
                       "manifest, but a sender's file is the sender's program. Pass --trust-torchscript "
                       "(trust_torchscript=True) for a bundle you made or trust")
AOTI_NOT_RUN = ("not loaded: an AOTInductor package is native code (a shared library loaded into the process); its "
                "sha256 matches the manifest, but a sender's file is the sender's program. Pass --trust-torchscript "
                "(trust_torchscript=True: it covers every file that runs code) for a bundle you made or trust")


def verify_bundle(path: Path, trust_torchscript: bool = False) -> dict[str, Any]:
    """Check a bundle: schema, checksums, files, every model loads, golden vectors reproduce,
    int8 models within their recorded gate against eager.

    TorchScript models are checksummed but loaded and run only with `trust_torchscript`;
    otherwise each is listed under "not_run" with the reason (never counted as passed).

    Returns a report of every check run — {check, passed, message on failure} — with
    `passed` over all; a failed check does not stop the independent ones after it, but
    nothing is loaded from a bundle whose files do not match their checksums. A corrupt
    archive is one failed check; a path that is not a bundle raises UserInputError.
    """
    checks: list[dict[str, Any]] = []
    not_run: list[dict[str, str]] = []
    report = {"bundle": str(path), "target": None, "passed": False, "checks": checks, "not_run": not_run}
    try:
        with open_bundle(path) as (folder, manifest):
            report["target"] = manifest["target"]
            checks.append({"check": "manifest schema", "passed": True})
            try:
                check_bundle_files(folder, manifest)
            except CheckFailed as exc:
                _fail(checks, "files: sha256, sizes, nothing extra or missing", str(exc))
            else:
                checks.append({"check": f"{len(manifest['files'])} files: sha256, sizes, nothing extra or missing",
                               "passed": True})
                _check_models(path, folder, manifest, checks, not_run if not trust_torchscript else None, not_run)
    except CheckFailed as exc:  # an archive that cannot be read or fails its inspection
        _fail(checks, "archive", str(exc))
    report["passed"] = bool(checks) and all(c["passed"] for c in checks)
    return report


def _fail(checks: list[dict[str, Any]], check: str, message: str) -> None:
    checks.append({"check": check, "passed": False, "message": message})


def first_failure(report: dict[str, Any]) -> str:
    """The message of a report's first failed check (for the one-line error)."""
    failed = [c for c in report["checks"] if not c["passed"]]
    return failed[0]["message"] + (f" (and {len(failed) - 1} more failed check(s))" if len(failed) > 1 else "")


def _check_models(path: Path, folder: Path, manifest: dict[str, Any], checks: list[dict[str, Any]],
                  not_run: list[dict[str, str]] | None = None, outside: list[dict[str, str]] | None = None) -> None:
    """Load every model and run the golden cases and int8 gates; with `not_run` (a list), the
    TorchScript models and AOTInductor packages are not loaded, each recorded there instead; a
    golden case outside an ExecuTorch program's recorded bounds is recorded in `outside` (not
    run, never passed). Over 60 lines: every failure is recorded as a check with its own
    message, not raised, so the report is whole."""
    from gru_deploy.bundle.quantize import gated_outputs, recorded_gates, rejudge_int8
    from gru_deploy.check.compare import compare
    from gru_deploy.manifest import answers_empty

    empty = answers_empty(manifest)  # the export's grid ran empty sequences and lengths of 0
    sessions = {}
    for name, info in manifest["models"].items():
        if info["format"] in ("torchscript", "aoti") and not_run is not None:
            not_run.append({"check": f"loads: {name}, and its golden cases",
                            "why": TORCHSCRIPT_NOT_RUN if info["format"] == "torchscript" else AOTI_NOT_RUN})
            continue
        try:
            known = frozenset(info["op_types"]) if info.get("op_types") else None  # the ops the export recorded
            sessions[name] = _load_model(folder / name, info["format"], known, info,
                                         manifest["signatures"].get(info.get("variant", "classifier")))
            checks.append({"check": f"loads: {name}", "passed": True})
        except CheckFailed as exc:
            _fail(checks, f"loads: {name}", str(exc))
    golden = json.loads((folder / manifest["golden"]["file"]).read_text())
    atol, rtol = manifest["golden"]["atol"], manifest["golden"]["rtol"]
    for case in golden["cases"]:
        try:
            inputs = _golden_feed(case, folder, "inputs")
            expected = _golden_feed(case, folder, "outputs")
        except CheckFailed as exc:
            _fail(checks, f"golden {case['name']}: data", str(exc))
            continue
        precision = case.get("precision", "fp32")
        models = [m for m, info in manifest["models"].items() if info.get("variant") == case["variant"]
                  and info.get("precision", "fp32") == precision]
        if case["model"] not in models:
            _fail(checks, f"golden {case['name']}: model", f"{path}: golden case {case['name']} names "
                  f"{case['model']!r}, not a {precision} {case['variant']} model of the bundle")
            continue
        case_atol, case_rtol = case.get("atol", atol), case.get("rtol", rtol)
        for model in models:
            check = f"golden {case['name']} on {model}"
            if model not in sessions:
                continue  # its load failure is reported above
            bounds = manifest["models"][model].get("seq")
            seq = np.shape(inputs.get("x"))[1] if np.ndim(inputs.get("x")) == 3 else None
            # a one-step program (the stream's, state in and out) steps through the case, as an app does
            stepped = bounds == [1, 1] and STATE_IN in inputs and seq is not None and seq > 1
            if bounds and seq is not None and not bounds[0] <= seq <= bounds[1] and not stepped:
                if outside is not None:
                    outside.append({"check": check, "why": f"the case's {seq} steps are outside {model}'s bounds "
                                                           f"({bounds[0]}..{bounds[1]} steps, in the manifest)"})
                continue
            try:
                got = (_stepped if stepped else _run)(sessions[model], manifest["models"][model]["format"],
                                                      manifest["signatures"][case["variant"]], inputs, empty)
            except UserInputError as exc:
                _fail(checks, check, f"{path}: golden {case['name']} does not fit {model}: {exc}")
                continue
            except Exception as exc:  # the runtime refused the model's own golden inputs
                _fail(checks, check, f"{path}: {model} failed on golden {case['name']}: "
                      f"{str(exc).strip().splitlines()[0][:200]}")
                continue
            for out_name, want in expected.items():
                result = compare(want, got[out_name], case_atol, case_rtol)
                entry = {"check": f"{check}: {out_name}", "passed": result.passed, "max_abs": result.max_abs}
                if not result:
                    entry["message"] = (f"{path}: golden {case['name']} on {model} ({out_name}): max abs error "
                                        f"{result.max_abs:.3g}, max rel {result.max_rel:.3g}: elements exceed both "
                                        f"atol {case_atol:g} and rtol {case_rtol:g}")
                checks.append(entry)
    quantization = manifest.get("quantization") or {}
    for model, record in (quantization.get("models") or {}).items():
        recorded = recorded_gates(record)  # each output but the state has its own gate
        signature = manifest["signatures"][(manifest["models"].get(model) or {}).get("variant", "classifier")]
        gates = {name: recorded.get(name, {}) for name in gated_outputs(signature)}
        for output, gate in gates.items():
            named = f" ({output})" if len(gates) > 1 else ""
            check = f"int8 gate: {model}{named} vs {gate.get('reference', 'eager')} on the int8 gate's sequences"
            reference_file = gate.get("reference_file")
            if "max_abs_bound" not in gate or "inputs" not in gate or reference_file not in manifest["files"]:
                _fail(checks, check, f"{path}: {model}{named} has no recorded int8 gate (bound, inputs and "
                      "reference rows); re-package with this gru-deploy")
                continue
            try:
                reference = np.load(folder / reference_file, allow_pickle=False)  # its sha256 was checked above
                verdict = rejudge_int8(folder / model, reference, gate)
            except UserInputError as exc:
                _fail(checks, check, str(exc))
                continue
            entry = {"check": check, "passed": verdict["passed"], "max_abs": verdict["max_abs"],
                     "quantile_abs": verdict["quantile_abs"], "max_abs_bound": gate["max_abs_bound"],
                     "argmax_agreement": verdict["argmax_agreement"]}
            if not verdict["passed"]:
                entry["message"] = (f"{path}: int8 {model}{named} against {gate.get('reference', 'eager')}: "
                                    f"{verdict['reason']}")
            checks.append(entry)


def _load_model(path: Path, fmt: str, known: frozenset[str] | None = None, info: dict[str, Any] | None = None,
                signature: dict[str, Any] | None = None) -> Any:
    if fmt == "onnx":
        from gru_deploy.convert.graphs import check_onnx_bytes

        check_onnx_bytes(path.read_bytes(), str(path), known)
    if fmt in ("onnx", "ort"):
        import onnxruntime as ort

        from gru_deploy.check.runners import session_options

        try:
            return ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own exception types
            raise CheckFailed(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from None
    if fmt == "torchscript":
        from gru_deploy.convert import script

        try:
            return script.load(path)  # its sha256 was checked against the manifest above
        except UserInputError as exc:
            raise CheckFailed(str(exc)) from None
    if fmt in ("aoti", "executorch"):  # parity's runners: an executorch runner checks the record's bounds
        from gru_deploy.check.module_parity import UserSignature, executorch_runner, program_runner

        try:
            sig = UserSignature(signature["inputs"], signature["outputs"])
            if fmt == "aoti":
                return program_runner(path.read_bytes(), sig, str(path), fmt)
            return executorch_runner(path.read_bytes(), sig, str(path), info or {})
        except ImportError:
            raise CheckFailed(f"{path}: ExecuTorch is not installed here (pip install 'gru-deploy[executorch]')") \
                from None
        except (KeyError, TypeError, RuntimeError) as exc:
            raise CheckFailed(f"{path}: cannot load it as {fmt} ({type(exc).__name__}: {exc})") from None
    raise CheckFailed(f"{path}: unknown model format {fmt!r} in the manifest")


def _stepped(session: Any, fmt: str, signature: dict[str, Any], inputs: dict[str, np.ndarray],
             empty: bool) -> dict[str, np.ndarray]:
    """A stream case through a one-step program: each step of x in turn, the state carried
    from each call's h_n to the next call's h0; the last call's outputs."""
    x, state, got = inputs[INPUT_NAME], inputs[STATE_IN], {}
    for t in range(x.shape[1]):
        got = _run(session, fmt, signature, {**inputs, INPUT_NAME: x[:, t:t + 1], STATE_IN: state}, empty)
        state = np.asarray(got[STATE_OUT], np.float32)
    return got


def _run(session: Any, fmt: str, signature: dict[str, Any], inputs: dict[str, np.ndarray],
         empty: bool) -> dict[str, np.ndarray]:
    """The golden inputs, checked against the model's signature before the runtime sees them (a
    GRU/LSTM kernel aborts on an empty axis: empty sequences and lengths of 0 only where the
    export's grid ran them, `empty`), run; every output by name."""
    from gru_deploy.check.runners import check_user_feed, run_module
    from gru_deploy.spec import LENGTHS_NAME

    names = [t["name"] for t in signature["inputs"]]
    if sorted(inputs) != sorted(names):
        raise UserInputError(f"golden inputs {sorted(inputs)}; the model takes {names}")
    feed = check_user_feed(inputs[INPUT_NAME], signature, empty, inputs.get(LENGTHS_NAME), inputs.get(STATE_IN))
    if fmt == "torchscript":
        return run_module(session, signature, feed)
    if fmt in ("aoti", "executorch"):  # check.module_parity's runners, answering float64
        return {name: np.asarray(value, np.float32) for name, value in session.run(feed).items()}
    outputs = [o["name"] for o in signature["outputs"]]
    return dict(zip(outputs, session.run(outputs, feed)))
