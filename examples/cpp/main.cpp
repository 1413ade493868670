// gru_golden: run a gru-deploy TorchScript classifier (model.pt) on the golden vectors of a
// bundle and compare its logits with the recorded ones (eager PyTorch).
//
//   gru_golden MODEL.pt GOLDEN.json [--atol A]
//
// golden.json: {"atol", "rtol", "cases": [{"name", "variant", "inputs": {"x": {"dtype",
// "shape", "data"}}, "outputs": {"logits": {...}}}, ...]}. Only the "classifier" cases are
// run (model.pt is forward(x) -> logits). Prints each case's max abs error and the overall
// one ("max abs error: <value>"), then exits 0 when every case is within atol (golden.json's,
// 1e-5 by default), 1 when not, 2 on bad usage or unreadable input.
#include <ATen/Parallel.h>
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
#include <string>
#include <vector>

using nlohmann::json;

namespace {

int usage(const std::string& message) {
  std::cerr << message << "\nusage: gru_golden MODEL.pt GOLDEN.json [--atol A]\n";
  return 2;
}

// A golden tensor as a float32 torch tensor (its "data" is the flat, row-major list).
torch::Tensor to_tensor(const json& t) {
  if (t.at("dtype").get<std::string>() != "float32") {
    throw std::runtime_error("expected a float32 tensor, got " + t.at("dtype").get<std::string>());
  }
  std::vector<int64_t> shape = t.at("shape").get<std::vector<int64_t>>();
  std::vector<float> data = t.at("data").get<std::vector<float>>();
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  if (count != static_cast<int64_t>(data.size())) {
    throw std::runtime_error("shape and data length disagree");
  }
  return torch::from_blob(data.data(), shape, torch::kFloat32).clone();
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  double atol_override = -1.0;
  std::vector<std::string> positional;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--atol" && i + 1 < args.size()) {
      atol_override = std::stod(args[++i]);
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
  try {
    module = torch::jit::load(positional[0]);
  } catch (const std::exception& e) {
    return usage("cannot load " + positional[0] + ": " + e.what());
  }
  module.eval();
  torch::NoGradGuard no_grad;
  at::set_num_threads(1);

  double worst = 0.0;
  int cases = 0, failed = 0;
  try {
    for (const json& c : golden.at("cases")) {
      if (c.at("variant").get<std::string>() != "classifier") continue;
      torch::Tensor x = to_tensor(c.at("inputs").at("x"));
      torch::Tensor want = to_tensor(c.at("outputs").at("logits"));
      torch::Tensor got = module.forward({x}).toTensor().to(torch::kFloat32).contiguous();
      double error = std::numeric_limits<double>::infinity();
      if (got.sizes() == want.sizes()) {
        error = (got - want).abs().max().item<double>();
        if (std::isnan(error)) error = std::numeric_limits<double>::infinity();
      }
      const bool ok = error <= atol;
      worst = std::max(worst, error);
      ++cases;
      if (!ok) ++failed;
      std::printf("%s  %-14s x %-12s max abs error %.3e\n", ok ? "ok  " : "FAIL",
                  c.at("name").get<std::string>().c_str(), c10::str(x.sizes()).c_str(), error);
    }
  } catch (const std::exception& e) {
    std::cerr << "error while running the golden cases: " << e.what() << "\n";
    return 2;
  }
  if (cases == 0) return usage(positional[1] + " has no classifier case");
  std::printf("%d classifier case(s), atol %g\n", cases, atol);
  std::printf("max abs error: %.9g\n", worst);
  std::printf("%s\n", failed == 0 ? "PASSED" : "FAILED");
  return failed == 0 ? 0 : 1;
}
