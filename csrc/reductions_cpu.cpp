// CPU implementation of the per-objective gradient reductions (always built).
//
// Chunks of 4096 elements keep the K inputs of a chunk in L1/L2 while the K(K+1)/2 pair dots
// reread them; each dot uses 8 independent fp32 accumulators in a fixed order, which the
// compiler vectorises without -ffast-math. Chunk partials are summed per group in chunk order
// in double. at::parallel_for hands out chunks, but a chunk's result does not depend on which
// thread computed it, so the output is identical for any thread count.
#include "reductions.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <type_traits>

namespace megalora {
namespace {

constexpr int64_t kChunkCpu = 4096;  // must match bindings.cpp's kCpuChunk

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

template <typename T>
float dot(const T* x, const T* y, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += to_float(x[i + j]) * to_float(y[i + j]);
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += to_float(x[i]) * to_float(y[i]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

inline float bf16_to_float(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

// A chunk of one list as fp32 (bf16/fp16 widened once per element, not once per pair).
template <typename T>
const float* widen(const T* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_float(bits[i]);
    return buf;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

template <typename T>
void chunk_gram(const Plan& plan, const Chunk& c, float* out, float* scratch) {
  const float* base[kMaxLists];
  const int64_t n = c.end - c.start;
  for (int k = 0; k < plan.K; ++k) {
    const T* src = static_cast<const T*>(plan.ptrs[k * plan.P + c.tensor]) + c.start;
    base[k] = widen(src, n, scratch + k * kChunkCpu);
  }
  int idx = 0;
  for (int a = 0; a < plan.K; ++a) {
    for (int b = a; b < plan.K; ++b) out[idx++] = dot(base[a], base[b], n);
  }
}

}  // namespace

void plan_chunks(Plan& plan, const std::vector<int64_t>& numel, int64_t chunk_elems) {
  std::vector<int64_t> order(plan.P);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return plan.groups[a] < plan.groups[b]; });
  plan.chunks.clear();
  plan.group_offsets.assign(plan.G + 1, 0);
  for (int64_t p : order) {
    for (int64_t s = 0; s < numel[p]; s += chunk_elems) {
      plan.chunks.push_back({p, s, std::min(numel[p], s + chunk_elems)});
    }
    plan.group_offsets[plan.groups[p] + 1] = static_cast<int64_t>(plan.chunks.size());
  }
  for (int64_t g = 1; g <= plan.G; ++g) {  // groups without tensors: empty ranges
    plan.group_offsets[g] = std::max(plan.group_offsets[g], plan.group_offsets[g - 1]);
  }
}

void gram_cpu(const Plan& plan, float* out) {
  const int K = plan.K;
  const int KK = K * (K + 1) / 2;
  const int64_t C = static_cast<int64_t>(plan.chunks.size());
  std::vector<float> partials(static_cast<size_t>(C) * KK, 0.f);
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(plan.K) * kChunkCpu);
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = plan.chunks[c];
      float* dst = partials.data() + c * KK;
      switch (plan.dtypes[ch.tensor]) {
        case kFloat32: chunk_gram<float>(plan, ch, dst, scratch.data()); break;
        case kBFloat16: chunk_gram<c10::BFloat16>(plan, ch, dst, scratch.data()); break;
        default: chunk_gram<c10::Half>(plan, ch, dst, scratch.data()); break;
      }
    }
  });
  for (int64_t g = 0; g < plan.G; ++g) {
    std::vector<double> sum(KK, 0.0);
    for (int64_t c = plan.group_offsets[g]; c < plan.group_offsets[g + 1]; ++c) {
      for (int i = 0; i < KK; ++i) sum[i] += partials[c * KK + i];
    }
    int idx = 0;
    for (int a = 0; a < K; ++a) {
      for (int b = a; b < K; ++b, ++idx) {
        out[(g * K + a) * K + b] = out[(g * K + b) * K + a] = static_cast<float>(sum[idx]);
      }
    }
  }
}

namespace {

template <typename T>
void add_scaled(float* acc, const T* src, float w, int64_t n, float* scratch) {
  const float* x = widen(src, n, scratch);
  for (int64_t i = 0; i < n; ++i) acc[i] += w * x[i];
}

template <typename O>
void load_out(float* acc, const void* out, int64_t start, int64_t n, float* scratch) {
  const float* x = widen(static_cast<const O*>(out) + start, n, scratch);
  std::memcpy(acc, x, n * sizeof(float));
}

template <typename O>
void store_out(const float* acc, void* out, int64_t start, int64_t n) {
  O* dst = static_cast<O*>(out) + start;
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<O>(acc[i]);
}

// One chunk: acc = out (or 0); acc += w_k * g_k for k = 0..K-1 in order; out = acc.
void combine_chunk(const Plan& plan, const Chunk& c, const float* w, void* out, int8_t odt,
                   bool accumulate, float* acc, float* scratch) {
  const int64_t n = c.end - c.start;
  if (accumulate) {
    switch (odt) {
      case kFloat32: load_out<float>(acc, out, c.start, n, scratch); break;
      case kBFloat16: load_out<c10::BFloat16>(acc, out, c.start, n, scratch); break;
      default: load_out<c10::Half>(acc, out, c.start, n, scratch); break;
    }
  } else {
    std::fill(acc, acc + n, 0.f);
  }
  for (int k = 0; k < plan.K; ++k) {
    const void* src = plan.ptrs[k * plan.P + c.tensor];
    switch (plan.dtypes[c.tensor]) {
      case kFloat32: add_scaled(acc, static_cast<const float*>(src) + c.start, w[k], n, scratch); break;
      case kBFloat16:
        add_scaled(acc, static_cast<const c10::BFloat16*>(src) + c.start, w[k], n, scratch);
        break;
      default: add_scaled(acc, static_cast<const c10::Half*>(src) + c.start, w[k], n, scratch); break;
    }
  }
  switch (odt) {
    case kFloat32: store_out<float>(acc, out, c.start, n); break;
    case kBFloat16: store_out<c10::BFloat16>(acc, out, c.start, n); break;
    default: store_out<c10::Half>(acc, out, c.start, n); break;
  }
}

}  // namespace

void combine_cpu(const Plan& plan, const float* weights, const std::vector<void*>& out_ptrs,
                 const std::vector<int8_t>& out_dtypes, bool accumulate) {
  const int64_t C = static_cast<int64_t>(plan.chunks.size());
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(kChunkCpu), scratch(kChunkCpu);
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = plan.chunks[c];
      combine_chunk(plan, ch, weights + plan.groups[ch.tensor] * plan.K, out_ptrs[ch.tensor],
                    out_dtypes[ch.tensor], accumulate, acc.data(), scratch.data());
    }
  });
}

}  // namespace megalora
