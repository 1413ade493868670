// gru_golden: run a gru-deploy TorchScript model (model.pt), or with --aoti an AOTInductor
// package (aoti/model.aoti.pt2 of a server bundle exported with --targets aoti), on the golden
// vectors of a bundle and compare every output with the recorded one.
//
//   gru_golden MODEL.pt GOLDEN.json [--variant classifier|lengths] [--atol A]
//   gru_golden --aoti PACKAGE.pt2 GOLDEN.json [--variant classifier] [--atol A]
//
// golden.json: {"atol", "rtol", "cases": [{"name", "variant", "inputs": {"x": {"dtype",
// "shape", "data"}, ...}, "outputs": {"logits": {...}, ...}}, ...]}. The cases of one variant
// are run (default: classifier): model.pt's forward takes the case's inputs by the names its
// TorchScript schema gives its arguments (x; x, lengths for a lengths model), and returns one
// tensor or a tuple, compared with the case's outputs in their order in golden.json (the
// signature's order). An AOTInductor package (torch::inductor::AOTIModelPackageLoader, no
// Python) takes the case's inputs in golden.json's order, the signature's, and returns a list
// of tensors. Works for the tutorial model's bundles and for a built-in family's or
// your own model's. Prints each case's max abs error and the overall one ("max abs error:
// <value>"), then exits 0 when every case is within atol (golden.json's, 1e-5 by default), 1
// when not, 2 on bad usage or unreadable input.
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <fstream>
#include <iostream>
#include <limits>
#include <memory>
#include <string>
#include <vector>

// ordered_json keeps golden.json's key order: a case's outputs in the signature's order.
using json = nlohmann::ordered_json;

namespace {

int usage(const std::string& message) {
  std::cerr << message << "\nusage: gru_golden [--aoti] MODEL GOLDEN.json [--variant classifier|lengths] [--atol A]\n";
  return 2;
}

// A golden tensor (float32 or int64) as a torch tensor (its "data" is the flat, row-major list).
torch::Tensor to_tensor(const json& t) {
  const std::string dtype = t.at("dtype").get<std::string>();
  std::vector<int64_t> shape = t.at("shape").get<std::vector<int64_t>>();
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  if (dtype == "float32") {
    std::vector<float> data = t.at("data").get<std::vector<float>>();
    if (count != static_cast<int64_t>(data.size())) throw std::runtime_error("shape and data length disagree");
    return torch::from_blob(data.data(), shape, torch::kFloat32).clone();
  }
  if (dtype == "int64") {
    std::vector<int64_t> data = t.at("data").get<std::vector<int64_t>>();
    if (count != static_cast<int64_t>(data.size())) throw std::runtime_error("shape and data length disagree");
    return torch::from_blob(data.data(), shape, torch::kInt64).clone();
  }
  throw std::runtime_error("unsupported dtype " + dtype);
}

// forward's outputs as a list: one tensor, or the elements of a tuple.
std::vector<torch::Tensor> as_tensors(const c10::IValue& value) {
  std::vector<torch::Tensor> out;
  if (value.isTuple()) {
    for (const c10::IValue& item : value.toTupleRef().elements()) out.push_back(item.toTensor());
  } else {
    out.push_back(value.toTensor());
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  double atol_override = -1.0;
  std::string variant = "classifier";
  bool aoti = false;
  std::vector<std::string> positional;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--aoti") {
      aoti = true;
    } else if (args[i] == "--atol" && i + 1 < args.size()) {
      atol_override = std::stod(args[++i]);
    } else if (args[i] == "--variant" && i + 1 < args.size()) {
      variant = args[++i];
    } else if (!args[i].empty() && args[i][0] == '-') {
      return usage("unknown option " + args[i]);
    } else {
      positional.push_back(args[i]);
    }
  }
  if (positional.size() != 2) return usage("need MODEL.pt and GOLDEN.json");

  json golden;
  try {
    std::ifstream in(positional[1]);
    if (!in) return usage("cannot open " + positional[1]);
    golden = json::parse(in);
  } catch (const std::exception& e) {
    return usage(positional[1] + ": not valid JSON: " + e.what());
  }
  const double atol = atol_override >= 0 ? atol_override : golden.value("atol", 1e-5);

  torch::jit::script::Module module;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> package;
  std::vector<std::string> arguments;  // forward's argument names, after self (TorchScript)
  try {
    if (aoti) {
      package = std::make_unique<torch::inductor::AOTIModelPackageLoader>(positional[0]);
    } else {
      module = torch::jit::load(positional[0]);
      for (const c10::Argument& a : module.get_method("forward").function().getSchema().arguments()) {
        if (a.name() != "self") arguments.push_back(a.name());
      }
      module.eval();
    }
  } catch (const std::exception& e) {
    return usage("cannot load " + positional[0] + ": " + e.what());
  }
  torch::NoGradGuard no_grad;
  at::set_num_threads(1);

  double worst = 0.0;
  int cases = 0, failed = 0;
  try {
    for (const json& c : golden.at("cases")) {
      if (c.at("variant").get<std::string>() != variant || c.value("precision", "fp32") != "fp32") continue;
      std::vector<torch::Tensor> got;
      if (aoti) {  // the package's inputs are the signature's, in golden.json's order
        std::vector<at::Tensor> tensors;
        for (auto it = c.at("inputs").begin(); it != c.at("inputs").end(); ++it) tensors.push_back(to_tensor(it.value()));
        got = package->run(tensors);
      } else {
        std::vector<c10::IValue> inputs;
        for (const std::string& name : arguments) {
          if (!c.at("inputs").contains(name)) {
            throw std::runtime_error("case " + c.at("name").get<std::string>() + " has no input '" + name + "'");
          }
          inputs.push_back(to_tensor(c.at("inputs").at(name)));
        }
        got = as_tensors(module.forward(inputs));
      }
      const json& outputs = c.at("outputs");
      double error = got.size() == outputs.size() ? 0.0 : std::numeric_limits<double>::infinity();
      size_t index = 0;
      for (auto it = outputs.begin(); it != outputs.end() && index < got.size(); ++it, ++index) {
        torch::Tensor want = to_tensor(it.value());
        torch::Tensor have = got[index].to(torch::kFloat32).contiguous();
        double e = std::numeric_limits<double>::infinity();
        if (have.sizes() == want.sizes()) {
          e = have.numel() ? (have - want).abs().max().item<double>() : 0.0;
          if (std::isnan(e)) e = std::numeric_limits<double>::infinity();
        }
        error = std::max(error, e);
      }
      const bool ok = error <= atol;
      worst = std::max(worst, error);
      ++cases;
      if (!ok) ++failed;
      const std::vector<int64_t> x_shape = c.at("inputs").at("x").at("shape").get<std::vector<int64_t>>();
      std::printf("%s  %-14s x %-12s max abs error %.3e\n", ok ? "ok  " : "FAIL",
                  c.at("name").get<std::string>().c_str(), c10::str(c10::IntArrayRef(x_shape)).c_str(), error);
    }
  } catch (const std::exception& e) {
    std::cerr << "error while running the golden cases: " << e.what() << "\n";
    return 2;
  }
  if (cases == 0) return usage(positional[1] + " has no fp32 " + variant + " case");
  std::printf("%d %s case(s), atol %g\n", cases, variant.c_str(), atol);
  std::printf("max abs error: %.9g\n", worst);
  std::printf("%s\n", failed == 0 ? "PASSED" : "FAILED");
  return failed == 0 ? 0 : 1;
}
