// CUDA side of megalora._C: turns a Plan into device tables and launches reductions_cuda.cu
// on the current stream. Compiled only when the extension is built with CUDA.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "reductions.h"

namespace megalora {
namespace cuda {
cudaError_t gram_cuda(const int64_t* ptrs, const int8_t* dtypes, const int64_t* chunks,
                      int64_t num_chunks, const int64_t* group_offsets, int64_t G, int K,
                      int64_t P, float* partials, float* out, int grid, cudaStream_t stream);
cudaError_t combine_cuda(const int64_t* ptrs, const int8_t* dtypes, const int64_t* out_ptrs,
                         const int8_t* out_dtypes, const int64_t* groups, const float* weights,
                         const int64_t* chunks, int64_t num_chunks, int64_t P, int K,
                         bool accumulate, int grid, cudaStream_t stream);
}  // namespace cuda

namespace {

// Host vector -> device tensor through pinned memory (an async copy on the current stream).
template <typename T>
torch::Tensor to_device(const std::vector<T>& v, torch::ScalarType type, const torch::Device& dev) {
  auto host = torch::empty({static_cast<int64_t>(v.size())},
                           torch::TensorOptions().dtype(type).pinned_memory(true));
  if (!v.empty()) std::memcpy(host.data_ptr(), v.data(), v.size() * sizeof(T));
  return host.to(dev, /*non_blocking=*/true);
}

std::vector<int64_t> chunk_rows(const Plan& plan) {
  std::vector<int64_t> rows;
  rows.reserve(plan.chunks.size() * 3);
  for (const Chunk& c : plan.chunks) rows.insert(rows.end(), {c.tensor, c.start, c.end});
  return rows;
}

std::vector<int64_t> addresses(const std::vector<const void*>& ptrs) {
  std::vector<int64_t> out(ptrs.size());
  for (size_t i = 0; i < ptrs.size(); ++i) out[i] = reinterpret_cast<int64_t>(ptrs[i]);
  return out;
}

int grid_for(const torch::Device& dev, int64_t num_chunks) {
  int sms = 132;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev.index());
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_chunks, 4LL * sms)));
}

}  // namespace

void gram_cuda_host(const Plan& plan, const torch::Device& dev, torch::Tensor out) {
  c10::cuda::CUDAGuard guard(dev);
  auto stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  auto ptrs = to_device(addresses(plan.ptrs), torch::kInt64, dev);
  auto dtypes = to_device(plan.dtypes, torch::kInt8, dev);
  auto chunks = to_device(chunk_rows(plan), torch::kInt64, dev);
  auto offsets = to_device(plan.group_offsets, torch::kInt64, dev);
  const int64_t C = static_cast<int64_t>(plan.chunks.size());
  auto partials = torch::empty({std::max<int64_t>(1, C) * plan.K * (plan.K + 1) / 2},
                               torch::TensorOptions().dtype(torch::kFloat32).device(dev));
  auto err = cuda::gram_cuda(ptrs.data_ptr<int64_t>(), dtypes.data_ptr<int8_t>(),
                             chunks.data_ptr<int64_t>(), C, offsets.data_ptr<int64_t>(), plan.G,
                             plan.K, plan.P, partials.data_ptr<float>(), out.data_ptr<float>(),
                             grid_for(dev, C), stream);
  TORCH_CHECK(err == cudaSuccess, "megalora gram kernel launch failed: ", cudaGetErrorString(err));
}

void combine_cuda_host(const Plan& plan, const torch::Device& dev, torch::Tensor weights,
                       const std::vector<void*>& out_ptrs, const std::vector<int8_t>& out_dtypes,
                       bool accumulate) {
  c10::cuda::CUDAGuard guard(dev);
  auto stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  std::vector<const void*> outs(out_ptrs.begin(), out_ptrs.end());
  auto ptrs = to_device(addresses(plan.ptrs), torch::kInt64, dev);
  auto dtypes = to_device(plan.dtypes, torch::kInt8, dev);
  auto optrs = to_device(addresses(outs), torch::kInt64, dev);
  auto odtypes = to_device(out_dtypes, torch::kInt8, dev);
  auto groups = to_device(plan.groups, torch::kInt64, dev);
  auto chunks = to_device(chunk_rows(plan), torch::kInt64, dev);
  auto w = weights.to(dev, torch::kFloat32).contiguous();
  const int64_t C = static_cast<int64_t>(plan.chunks.size());
  auto err = cuda::combine_cuda(ptrs.data_ptr<int64_t>(), dtypes.data_ptr<int8_t>(),
                                optrs.data_ptr<int64_t>(), odtypes.data_ptr<int8_t>(),
                                groups.data_ptr<int64_t>(), w.data_ptr<float>(),
                                chunks.data_ptr<int64_t>(), C, plan.P, plan.K, accumulate,
                                grid_for(dev, C), stream);
  TORCH_CHECK(err == cudaSuccess, "megalora combine kernel launch failed: ",
              cudaGetErrorString(err));
}

}  // namespace megalora
