// megalora._C: Python bindings, input validation and device dispatch. No maths here.
//
//   gram(grads: list[list[Tensor]] (K x P), groups: int64 [P], num_groups) -> [G, K, K] fp32
//   combine(grads, weights: [G, K], groups, out: list[Tensor] (P), accumulate) -> None
//
// Every check names the list and tensor index and what to change. The GIL is released while the
// reductions run.
#include <torch/extension.h>

#include <sstream>

#include "reductions.h"

namespace megalora {

#ifdef MEGALORA_WITH_CUDA
void gram_cuda_host(const Plan& plan, const torch::Device& dev, torch::Tensor out);
void combine_cuda_host(const Plan& plan, const torch::Device& dev, torch::Tensor weights,
                       const std::vector<void*>& out_ptrs, const std::vector<int8_t>& out_dtypes,
                       bool accumulate);
#endif

namespace {

constexpr int64_t kCpuChunk = 4096;    // fits the K inputs of a chunk in L1/L2
constexpr int64_t kCudaChunk = 65536;  // 256 threads x 256 elements per block

int8_t dtype_code(const torch::Tensor& t, const char* op, int64_t p) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return kFloat32;
    case torch::kBFloat16: return kBFloat16;
    case torch::kFloat16: return kFloat16;
    default:
      TORCH_CHECK(false, op, ": tensor ", p, " has dtype ", t.scalar_type(),
                  "; supported are float32, bfloat16 and float16");
  }
  return kFloat32;
}

std::string shape_str(const torch::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// Checks the K x P lists and fills ptrs/dtypes; returns the common device.
torch::Device validate_lists(const std::vector<std::vector<torch::Tensor>>& grads, const char* op,
                             Plan& plan, std::vector<int64_t>& numel) {
  const int K = static_cast<int>(grads.size());
  TORCH_CHECK(K >= 1 && K <= kMaxLists, op, ": need 1 to ", kMaxLists,
              " gradient lists (one per objective), got ", K);
  const int64_t P = static_cast<int64_t>(grads[0].size());
  for (int k = 1; k < K; ++k) {
    TORCH_CHECK(static_cast<int64_t>(grads[k].size()) == P, op, ": list ", k, " has ",
                grads[k].size(), " tensors but list 0 has ", P,
                "; every objective's list must hold the same parameters in the same order");
  }
  plan.K = K;
  plan.P = P;
  plan.ptrs.assign(static_cast<size_t>(K) * P, nullptr);
  plan.dtypes.assign(P, kFloat32);
  numel.assign(P, 0);
  torch::Device device = P > 0 ? grads[0][0].device() : torch::Device(torch::kCPU);
  for (int64_t p = 0; p < P; ++p) {
    const torch::Tensor& ref = grads[0][p];
    TORCH_CHECK(ref.defined(), op, ": tensor ", p, " of list 0 is undefined (None)");
    plan.dtypes[p] = dtype_code(ref, op, p);
    numel[p] = ref.numel();
    for (int k = 0; k < K; ++k) {
      const torch::Tensor& t = grads[k][p];
      TORCH_CHECK(t.defined(), op, ": tensor ", p, " of list ", k, " is undefined (None)");
      TORCH_CHECK(t.device() == device, op, ": tensor ", p, " of list ", k, " is on ", t.device(),
                  " but tensor 0 of list 0 is on ", device, "; move all gradients to one device");
      TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": tensor ", p, " has dtype ",
                  t.scalar_type(), " in list ", k, " but ", ref.scalar_type(),
                  " in list 0; cast the lists to the same dtype");
      TORCH_CHECK(t.sizes() == ref.sizes(), op, ": tensor ", p, " of list ", k, " has shape ",
                  shape_str(t), " but list 0 has ", shape_str(ref));
      TORCH_CHECK(t.is_contiguous(), op, ": tensor ", p, " of list ", k,
                  " is not contiguous; pass .contiguous() gradients");
      plan.ptrs[k * P + p] = t.data_ptr();
    }
  }
  TORCH_CHECK(device.is_cpu() || device.is_cuda(), op, ": tensors on ", device,
              " are not supported (CPU or CUDA)");
  return device;
}

void validate_groups(const torch::Tensor& groups, int64_t num_groups, const char* op, Plan& plan) {
  TORCH_CHECK(num_groups >= 1, op, ": num_groups must be >= 1, got ", num_groups);
  TORCH_CHECK(groups.dim() == 1 && groups.size(0) == plan.P, op, ": groups must be a 1-D tensor "
              "with one group index per tensor (", plan.P, "), got shape ", shape_str(groups));
  auto g = groups.to(torch::kCPU, torch::kInt64).contiguous();
  const int64_t* data = g.data_ptr<int64_t>();
  plan.G = num_groups;
  plan.groups.assign(data, data + plan.P);
  for (int64_t p = 0; p < plan.P; ++p) {
    TORCH_CHECK(data[p] >= 0 && data[p] < num_groups, op, ": groups[", p, "] = ", data[p],
                " is outside [0, ", num_groups, ")");
  }
}

}  // namespace

torch::Tensor gram(const std::vector<std::vector<torch::Tensor>>& grads, torch::Tensor groups,
                   int64_t num_groups) {
  Plan plan;
  std::vector<int64_t> numel;
  const torch::Device device = validate_lists(grads, "gram", plan, numel);
  validate_groups(groups, num_groups, "gram", plan);
  auto out = torch::zeros({plan.G, plan.K, plan.K},
                          torch::TensorOptions().dtype(torch::kFloat32).device(device));
  if (device.is_cuda()) {
#ifdef MEGALORA_WITH_CUDA
    plan_chunks(plan, numel, kCudaChunk);
    gram_cuda_host(plan, device, out);
    return out;
#else
    TORCH_CHECK(false, "gram: megalora._C was built without CUDA; rebuild on a machine with the "
                "CUDA toolkit (MEGALORA_FORCE_CUDA=1 pip install --no-build-isolation -e .) or "
                "pass CPU tensors");
#endif
  }
  plan_chunks(plan, numel, kCpuChunk);
  gram_cpu(plan, out.data_ptr<float>());
  return out;
}

void combine(const std::vector<std::vector<torch::Tensor>>& grads, torch::Tensor weights,
             torch::Tensor groups, const std::vector<torch::Tensor>& out, bool accumulate) {
  Plan plan;
  std::vector<int64_t> numel;
  const torch::Device device = validate_lists(grads, "combine", plan, numel);
  TORCH_CHECK(weights.dim() == 2 && weights.size(1) == plan.K, "combine: weights must be [G, K=",
              plan.K, "], got shape ", shape_str(weights));
  validate_groups(groups, weights.size(0), "combine", plan);
  TORCH_CHECK(static_cast<int64_t>(out.size()) == plan.P, "combine: out has ", out.size(),
              " tensors but the gradient lists have ", plan.P);
  std::vector<void*> out_ptrs(plan.P);
  std::vector<int8_t> out_dtypes(plan.P);
  for (int64_t p = 0; p < plan.P; ++p) {
    const torch::Tensor& o = out[p];
    TORCH_CHECK(o.defined() && o.device() == device, "combine: out[", p, "] must be on ", device);
    TORCH_CHECK(o.sizes() == grads[0][p].sizes(), "combine: out[", p, "] has shape ",
                shape_str(o), " but the gradients have ", shape_str(grads[0][p]));
    TORCH_CHECK(o.is_contiguous(), "combine: out[", p, "] is not contiguous");
    out_dtypes[p] = dtype_code(o, "combine (out)", p);
    out_ptrs[p] = o.data_ptr();
  }
  if (device.is_cuda()) {
#ifdef MEGALORA_WITH_CUDA
    plan_chunks(plan, numel, kCudaChunk);
    combine_cuda_host(plan, device, weights, out_ptrs, out_dtypes, accumulate);
    return;
#else
    TORCH_CHECK(false, "combine: megalora._C was built without CUDA; rebuild with the CUDA "
                "toolkit or pass CPU tensors");
#endif
  }
  auto w = weights.to(torch::kCPU, torch::kFloat32).contiguous();
  plan_chunks(plan, numel, kCpuChunk);
  combine_cpu(plan, w.data_ptr<float>(), out_ptrs, out_dtypes, accumulate);
}

bool has_cuda() {
#ifdef MEGALORA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace megalora

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megalora per-objective gradient reductions (Gram matrix, weighted combine)";
  m.def("gram", &megalora::gram, "K x K inner products per parameter group",
        py::arg("grads"), py::arg("groups"), py::arg("num_groups"),
        py::call_guard<py::gil_scoped_release>());
  m.def("combine", &megalora::combine, "out[p] = sum_k w[group(p), k] * grads[k][p] (+ out[p])",
        py::arg("grads"), py::arg("weights"), py::arg("groups"), py::arg("out"),
        py::arg("accumulate") = false, py::call_guard<py::gil_scoped_release>());
  m.def("has_cuda", &megalora::has_cuda, "built with the CUDA kernels");
}
