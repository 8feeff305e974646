// CUDA kernels for the per-objective gradient reductions. Plain CUDA (no torch headers), so CI
// can compile this file with nvcc alone; reductions_cuda_host.cpp launches it from torch.
//
// gram: a persistent grid walks the chunk table (chunk c -> block c mod grid); a block reduces
// one chunk's K(K+1)/2 products with a fixed shuffle tree and writes one partial row; a second
// kernel sums each group's partial rows in chunk order. No atomics: same bits every run.
// combine: the same chunk walk, out[i] = sum_k w[g,k] g_k[i] (+ out[i]), fp32 arithmetic.
// All element offsets are 64-bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace megalora {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float load_f(const void* base, int8_t dt, int64_t i) {
  if (dt == 0) return static_cast<const float*>(base)[i];
  if (dt == 1) return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  return __half2float(static_cast<const __half*>(base)[i]);
}

__device__ __forceinline__ void store_f(void* base, int8_t dt, int64_t i, float v) {
  if (dt == 0) {
    static_cast<float*>(base)[i] = v;
  } else if (dt == 1) {
    static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
  } else {
    static_cast<__half*>(base)[i] = __float2half_rn(v);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <int K>
__global__ void __launch_bounds__(kThreads) gram_partials_kernel(
    const int64_t* __restrict__ ptrs, const int8_t* __restrict__ dtypes,
    const int64_t* __restrict__ chunks /* [C, 3]: tensor, start, end */, int64_t num_chunks,
    int64_t P, float* __restrict__ partials) {
  constexpr int KK = K * (K + 1) / 2;
  __shared__ float red[KK][kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const int64_t p = chunks[3 * c], start = chunks[3 * c + 1], end = chunks[3 * c + 2];
    const int8_t dt = dtypes[p];
    const void* base[K];
#pragma unroll
    for (int k = 0; k < K; ++k) base[k] = reinterpret_cast<const void*>(ptrs[k * P + p]);
    float acc[KK];
#pragma unroll
    for (int i = 0; i < KK; ++i) acc[i] = 0.f;
    for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
      float v[K];
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] = load_f(base[k], dt, i);
      int idx = 0;
#pragma unroll
      for (int a = 0; a < K; ++a) {
#pragma unroll
        for (int b = a; b < K; ++b) acc[idx++] += v[a] * v[b];
      }
    }
#pragma unroll
    for (int i = 0; i < KK; ++i) {
      const float s = warp_sum(acc[i]);
      if (lane == 0) red[i][warp] = s;
    }
    __syncthreads();
    if (threadIdx.x < KK) {
      float s = 0.f;
      for (int w = 0; w < kWarps; ++w) s += red[threadIdx.x][w];
      partials[c * KK + threadIdx.x] = s;
    }
    __syncthreads();
  }
}

__global__ void gram_reduce_kernel(const float* __restrict__ partials,
                                   const int64_t* __restrict__ group_offsets, int64_t G, int K,
                                   float* __restrict__ out) {
  const int KK = K * (K + 1) / 2;
  const int64_t g = blockIdx.x;
  if (g >= G || threadIdx.x >= KK) return;
  double s = 0.0;  // chunk order, one thread per pair: deterministic
  for (int64_t c = group_offsets[g]; c < group_offsets[g + 1]; ++c) s += partials[c * KK + threadIdx.x];
  int a = 0, rest = threadIdx.x;
  while (rest >= K - a) {
    rest -= K - a;
    ++a;
  }
  const int b = a + rest;
  out[(g * K + a) * K + b] = static_cast<float>(s);
  out[(g * K + b) * K + a] = static_cast<float>(s);
}

__global__ void __launch_bounds__(kThreads) combine_kernel(
    const int64_t* __restrict__ ptrs, const int8_t* __restrict__ dtypes,
    const int64_t* __restrict__ out_ptrs, const int8_t* __restrict__ out_dtypes,
    const int64_t* __restrict__ groups, const float* __restrict__ weights,
    const int64_t* __restrict__ chunks, int64_t num_chunks, int64_t P, int K, bool accumulate) {
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const int64_t p = chunks[3 * c], start = chunks[3 * c + 1], end = chunks[3 * c + 2];
    const int8_t dt = dtypes[p], odt = out_dtypes[p];
    const float* w = weights + groups[p] * K;
    void* out = reinterpret_cast<void*>(out_ptrs[p]);
    for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
      float v = accumulate ? load_f(out, odt, i) : 0.f;
      for (int k = 0; k < K; ++k) v += w[k] * load_f(reinterpret_cast<const void*>(ptrs[k * P + p]), dt, i);
      store_f(out, odt, i, v);
    }
  }
}

template <int K>
void launch_partials(const int64_t* ptrs, const int8_t* dtypes, const int64_t* chunks,
                     int64_t num_chunks, int64_t P, float* partials, int grid, cudaStream_t s) {
  gram_partials_kernel<K><<<grid, kThreads, 0, s>>>(ptrs, dtypes, chunks, num_chunks, P, partials);
}

// Host entry points (raw device pointers, current stream). Returns the launch error, if any.
cudaError_t gram_cuda(const int64_t* ptrs, const int8_t* dtypes, const int64_t* chunks,
                      int64_t num_chunks, const int64_t* group_offsets, int64_t G, int K,
                      int64_t P, float* partials, float* out, int grid, cudaStream_t stream) {
  if (num_chunks > 0) {
    switch (K) {
      case 1: launch_partials<1>(ptrs, dtypes, chunks, num_chunks, P, partials, grid, stream); break;
      case 2: launch_partials<2>(ptrs, dtypes, chunks, num_chunks, P, partials, grid, stream); break;
      case 3: launch_partials<3>(ptrs, dtypes, chunks, num_chunks, P, partials, grid, stream); break;
      case 4: launch_partials<4>(ptrs, dtypes, chunks, num_chunks, P, partials, grid, stream); break;
      case 5: launch_partials<5>(ptrs, dtypes, chunks, num_chunks, P, partials, grid, stream); break;
      case 6: launch_partials<6>(ptrs, dtypes, chunks, num_chunks, P, partials, grid, stream); break;
      case 7: launch_partials<7>(ptrs, dtypes, chunks, num_chunks, P, partials, grid, stream); break;
      default: launch_partials<8>(ptrs, dtypes, chunks, num_chunks, P, partials, grid, stream); break;
    }
  }
  if (G > 0) gram_reduce_kernel<<<static_cast<unsigned>(G), 64, 0, stream>>>(partials, group_offsets, G, K, out);
  return cudaGetLastError();
}

cudaError_t combine_cuda(const int64_t* ptrs, const int8_t* dtypes, const int64_t* out_ptrs,
                         const int8_t* out_dtypes, const int64_t* groups, const float* weights,
                         const int64_t* chunks, int64_t num_chunks, int64_t P, int K,
                         bool accumulate, int grid, cudaStream_t stream) {
  if (num_chunks > 0) {
    combine_kernel<<<grid, kThreads, 0, stream>>>(ptrs, dtypes, out_ptrs, out_dtypes, groups,
                                                  weights, chunks, num_chunks, P, K, accumulate);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace megalora
