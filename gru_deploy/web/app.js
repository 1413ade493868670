// gru-deploy edge bundle page: onnxruntime-web (WASM) on the bundle's model.onnx and its first
// golden classifier case: every input and output of the case by name (the tutorial model's, a
// built-in family's or your own), the first output's scores for sample 0 drawn as bars. Query parameters: ort= URL of ort.min.js (default ./ort/ort.min.js,
// its wasm files are looked up next to it); bundle= URL of the bundle folder (default ..).
"use strict";
(function () {
  var TOLERANCE = 1e-4; // max abs error allowed between these logits and the golden ones
  var params = new URLSearchParams(location.search);
  var ortUrl = new URL(params.get("ort") || "./ort/ort.min.js", location.href);
  var bundleUrl = new URL((params.get("bundle") || "..").replace(/\/?$/, "/"), location.href);
  var $ = function (id) { return document.getElementById(id); };

  function status(text) { $("status").textContent = text; }

  function fail(error) {
    var result = $("result");
    result.hidden = false;
    result.dataset.status = "error";
    $("verdict").textContent = "Error: " + (error && error.message ? error.message : String(error));
    status("failed");
    window.gruResult = { status: "error", error: String(error && error.message || error) };
  }

  function loadScript(url) {
    return new Promise(function (resolve, reject) {
      var script = document.createElement("script");
      script.src = url;
      script.onload = resolve;
      script.onerror = function () { reject(new Error("cannot load onnxruntime-web from " + url)); };
      document.head.appendChild(script);
    });
  }

  async function fetchOk(url, kind) {
    var response = await fetch(url);
    if (!response.ok) throw new Error(url + ": HTTP " + response.status);
    return kind === "json" ? response.json() : response.arrayBuffer();
  }

  function softmax(logits) {
    var top = Math.max.apply(null, logits);
    var exps = logits.map(function (v) { return Math.exp(v - top); });
    var sum = exps.reduce(function (a, b) { return a + b; }, 0);
    return exps.map(function (v) { return v / sum; });
  }

  function drawBars(labels, probabilities, best) {
    var svg = $("bars"), ns = "http://www.w3.org/2000/svg";
    var rowHeight = 30, labelWidth = 110, width = 560, barMax = width - labelWidth - 70;
    svg.setAttribute("viewBox", "0 0 " + width + " " + labels.length * rowHeight);
    svg.setAttribute("height", String(labels.length * rowHeight));
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    labels.forEach(function (label, i) {
      var y = i * rowHeight;
      var name = document.createElementNS(ns, "text");
      name.setAttribute("x", "0"); name.setAttribute("y", String(y + 19));
      name.textContent = label;
      var track = document.createElementNS(ns, "rect");
      track.setAttribute("x", String(labelWidth)); track.setAttribute("y", String(y + 5));
      track.setAttribute("width", String(barMax)); track.setAttribute("height", "20");
      track.setAttribute("fill", "#eef0f4"); track.setAttribute("rx", "3");
      var bar = document.createElementNS(ns, "rect");
      bar.setAttribute("class", "bar");
      bar.setAttribute("data-label", label);
      bar.setAttribute("x", String(labelWidth)); bar.setAttribute("y", String(y + 5));
      bar.setAttribute("width", String(Math.max(1, probabilities[i] * barMax)));
      bar.setAttribute("height", "20"); bar.setAttribute("rx", "3");
      bar.setAttribute("fill", i === best ? "#2f6fdb" : "#9aa6bd");
      var value = document.createElementNS(ns, "text");
      value.setAttribute("x", String(labelWidth + barMax + 8)); value.setAttribute("y", String(y + 19));
      value.textContent = (100 * probabilities[i]).toFixed(1) + "%";
      [name, track, bar, value].forEach(function (node) { svg.appendChild(node); });
    });
  }

  async function main() {
    status("loading onnxruntime-web from " + ortUrl.href);
    await loadScript(ortUrl.href);
    if (typeof ort === "undefined") throw new Error(ortUrl.href + " did not define ort");
    ort.env.wasm.wasmPaths = new URL("./", ortUrl).href; // the .wasm / .mjs files next to ort.min.js
    ort.env.wasm.numThreads = 1; // no cross-origin isolation needed
    status("loading the bundle from " + bundleUrl.href);
    var manifest = await fetchOk(new URL("manifest.json", bundleUrl), "json");
    var golden = await fetchOk(new URL("golden/golden.json", bundleUrl), "json");
    var gcase = golden.cases.filter(function (c) { return c.variant === "classifier" && (c.precision || "fp32") === "fp32"; })[0];
    if (!gcase) throw new Error("golden.json has no classifier case");
    var model = await fetchOk(new URL(gcase.model, bundleUrl), "bytes");
    status("running " + gcase.model + " with onnxruntime-web " + (ort.env.versions && ort.env.versions.web || "") + " (wasm)");
    var session = await ort.InferenceSession.create(model, { executionProviders: ["wasm"] });
    var feeds = {};  // every input of the case, by name (x; lengths, h0 for other variants)
    Object.keys(gcase.inputs).forEach(function (name) {
      var t = gcase.inputs[name];
      feeds[name] = t.dtype === "int64"
        ? new ort.Tensor("int64", BigInt64Array.from(t.data.map(function (v) { return BigInt(v); })), t.shape)
        : new ort.Tensor("float32", Float32Array.from(t.data), t.shape);
    });
    var x = gcase.inputs.x;
    var output = await session.run(feeds);
    var names = Object.keys(gcase.outputs);  // the signature's outputs, in its order
    var errors = {}, maxAbs = 0;
    names.forEach(function (name) {
      var got = output[name], want = gcase.outputs[name];
      var e = got && got.dims.join() === want.shape.join() ? 0 : Infinity;
      for (var i = 0; i < want.data.length && e !== Infinity; i++) {
        var d = Math.abs(got.data[i] - want.data[i]);
        e = d > e || d !== d ? d : e; // NaN propagates
      }
      errors[name] = e;
      maxAbs = e > maxAbs || e !== e ? e : maxAbs;
    });
    // The first output's scores for sample 0 (a per-step output: its last step) as the bars.
    var want = gcase.outputs[names[0]], shape = want.shape;
    var classes = shape[shape.length - 1];
    var perSample = want.data.length / shape[0];
    var got0 = output[names[0]] ? output[names[0]].data : want.data;
    var logits = Array.from(got0.slice(perSample - classes, perSample));
    var probabilities = softmax(logits);
    var best = probabilities.indexOf(Math.max.apply(null, probabilities));
    var labels = manifest.labels && manifest.labels.length === classes
      ? manifest.labels : logits.map(function (_, k) { return "class " + k; });
    var match = maxAbs <= TOLERANCE;

    var result = $("result");
    result.hidden = false;
    result.dataset.status = match ? "match" : "mismatch";
    $("case").textContent = "golden case " + gcase.name + ": x " + JSON.stringify(x.shape) +
      (x.shape[0] > 1 ? " (showing sample 0)" : "");
    $("label").textContent = "Predicted" + (shape.length > 2 ? " at the last step" : "") + ": " + labels[best] +
      " (" + (100 * probabilities[best]).toFixed(1) + "%)";
    drawBars(labels, probabilities, best);
    $("verdict").textContent = (match ? "Matches the golden output" : "Does NOT match the golden output") +
      ": max abs error of " + names.join(", ") + " " + maxAbs.toExponential(2) + (match ? " \u2264 " : " > ") +
      "tolerance " + TOLERANCE.toExponential(0) + ".";
    $("details").textContent = names[0] + " " + logits.map(function (v) { return v.toFixed(5); }).join(", ") +
      " \u2014 golden " + Array.from(want.data.slice(perSample - classes, perSample))
        .map(function (v) { return v.toFixed(5); }).join(", ") + ".";
    status("done: onnxruntime-web " + (ort.env.versions && ort.env.versions.web || "") + ", wasm backend");
    window.gruResult = { status: result.dataset.status, case: gcase.name, label: labels[best], maxAbs: maxAbs,
                         tolerance: TOLERANCE, probabilities: probabilities, logits: logits, errors: errors,
                         outputs: names };
  }

  main().catch(fail);
})();
