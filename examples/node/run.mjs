// Run a gru-deploy edge bundle's golden vectors in onnxruntime-node.
//
//   npm install --ignore-scripts      (the CPU binaries ship in the package; the install
//                                      script only fetches optional CUDA libraries)
//   node run.mjs path/to/edge-bundle
//
// For every case in golden/golden.json it runs every .onnx and .ort model that manifest.json
// lists for the case's variant and precision (fp32: model.onnx and model.ort, ...; int8:
// model.int8.onnx) and compares every output with the golden one (eager PyTorch at export;
// an int8 case, the int8 model's own). Then it feeds each stream case chunk by chunk (chunks of 1 and of 5 steps),
// carrying h_n into the next h0, and checks that the final logits and h_n equal one pass.
// Exit 0 when everything is within tolerance (golden.json's atol, 1e-5; a case's own atol
// where it has one), 1 otherwise, 2 on bad usage.
import { readFileSync, existsSync } from "node:fs";
import { join } from "node:path";
import ort from "onnxruntime-node";

const CHUNK_SIZES = [1, 5];

function usage(message) {
  console.error(`${message}\nusage: node run.mjs EDGE_BUNDLE_FOLDER`);
  process.exit(2);
}

const bundle = process.argv[2];
if (!bundle) usage("missing the bundle folder");
const goldenPath = join(bundle, "golden", "golden.json");
if (!existsSync(goldenPath)) usage(`${goldenPath} not found (is ${bundle} a gru-deploy edge bundle folder?)`);
const golden = JSON.parse(readFileSync(goldenPath, "utf8"));
const manifest = JSON.parse(readFileSync(join(bundle, "manifest.json"), "utf8"));

// The models to run a case on: what the manifest says they are, never a file-name pattern.
function modelsFor(c) {
  const precision = c.precision ?? "fp32";
  return Object.entries(manifest.models)
    .filter(([, m]) => m.variant === c.variant && (m.precision ?? "fp32") === precision
      && (m.format === "onnx" || m.format === "ort"))
    .map(([path, m]) => ({ path, format: m.format, precision }));
}
const defaultAtol = golden.atol ?? 1e-5;

function toTensor(t) {
  if (t.dtype === "float32") return new ort.Tensor("float32", Float32Array.from(t.data), t.shape);
  if (t.dtype === "int64") return new ort.Tensor("int64", BigInt64Array.from(t.data.map(BigInt)), t.shape);
  throw new Error(`unsupported dtype ${t.dtype}`);
}

function maxAbs(got, want) {
  if (got.length !== want.length) return Infinity;
  let worst = 0;
  for (let i = 0; i < got.length; i++) {
    const d = Math.abs(Number(got[i]) - Number(want[i]));
    if (!(d <= worst)) worst = d; // NaN makes it NaN, which fails every check below
  }
  return worst;
}

function sameShape(a, b) {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

const sessions = new Map();
async function session(file) {
  if (!sessions.has(file)) {
    const options = { intraOpNumThreads: 1, interOpNumThreads: 1, graphOptimizationLevel: "all" };
    sessions.set(file, await ort.InferenceSession.create(join(bundle, file), options));
  }
  return sessions.get(file);
}

// x [batch, seq, features] -> x[:, start:end, :]
function sliceSeq(x, start, end) {
  const [batch, seq, features] = x.dims;
  const out = new Float32Array(batch * (end - start) * features);
  for (let b = 0; b < batch; b++) {
    const from = (b * seq + start) * features;
    out.set(x.data.subarray(from, from + (end - start) * features), b * (end - start) * features);
  }
  return new ort.Tensor("float32", out, [batch, end - start, features]);
}

let failed = 0;
const worst = {}; // model format (onnx, ort, chunked) -> max abs error over all cases
function record(kind, error, tol, what) {
  const ok = error <= tol;
  if (!ok) failed++;
  worst[kind] = Math.max(worst[kind] ?? 0, Number.isNaN(error) ? Infinity : error);
  console.log(`${ok ? "ok  " : "FAIL"}  ${what.padEnd(62)} max abs error ${error.toExponential(2)} (tol ${tol})`);
}

const cases = golden.cases;  // every variant: classifier, stream, lengths (a model's own, too)
if (cases.length === 0) usage(`${goldenPath} has no case`);
console.log(`onnxruntime-node ${ort.env.versions?.node ?? ort.env.versions?.common ?? ""}, bundle ${bundle}`);
for (const c of cases) {
  const tol = c.atol ?? defaultAtol;
  const feeds = Object.fromEntries(Object.entries(c.inputs).map(([name, t]) => [name, toTensor(t)]));
  const models = modelsFor(c);
  if (!models.some((m) => m.path === c.model)) usage(`golden case ${c.name} names ${c.model}, not a model the manifest lists`);
  for (const { path: model, format, precision } of models) {
    const kind = precision === "fp32" ? format : `${format}-${precision}`;
    const s = await session(model);
    const result = await s.run(feeds);
    for (const [name, want] of Object.entries(c.outputs)) {
      const got = result[name];
      const error = got && sameShape(got.dims, want.shape) ? maxAbs(got.data, want.data) : Infinity;
      record(kind, error, tol, `${c.name} ${model} ${name}`);
    }
    if (c.variant !== "stream") continue;
    // Chunk by chunk, carrying the state: must equal the one pass just made.
    const seq = feeds.x.dims[1];
    for (const size of CHUNK_SIZES) {
      let h = feeds.h0;
      let out;
      for (let start = 0; start < seq; start += size) {
        out = await s.run({ x: sliceSeq(feeds.x, start, Math.min(seq, start + size)), h0: h });
        h = out.h_n;
      }
      for (const name of Object.keys(c.outputs)) {  // every output, h_n included
        // A per-step output ([batch, seq, ...]) of the last chunk is the one pass's last steps.
        const last = out[name];
        const want = sameShape(last.dims, result[name].dims) ? result[name]
          : sliceSeq(result[name], seq - last.dims[1], seq);
        const error = sameShape(last.dims, want.dims) ? maxAbs(last.data, want.data) : Infinity;
        record(`${kind}-chunked`, error, tol, `${c.name} ${model} chunks of ${size}: ${name} vs one pass`);
      }
    }
  }
}
console.log(`RESULT ${JSON.stringify({ passed: failed === 0, failed, max_abs: worst })}`);
process.exit(failed === 0 ? 0 : 1);
