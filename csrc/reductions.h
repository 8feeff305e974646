// Per-objective gradient reductions over K lists of P tensors (megalora._C).
//
// The plan is built once per call on the host: tensors are visited grouped by parameter group,
// each split into fixed-size chunks. Every chunk yields K(K+1)/2 partial inner products; the
// partials of a group are summed in chunk order. Nothing depends on thread or block scheduling,
// so results are the same bits run to run (and for any CPU thread count).
#pragma once

#include <cstdint>
#include <vector>

namespace megalora {

enum DType : int8_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kMaxLists = 8;  // K: objectives (text, image, ...)

struct Chunk {
  int64_t tensor;  // index p into the P tensors
  int64_t start;   // element range [start, end) of that tensor
  int64_t end;
};

struct Plan {
  int K = 0;
  int64_t P = 0;
  int64_t G = 0;
  std::vector<const void*> ptrs;       // [K * P], list-major: ptrs[k * P + p]
  std::vector<int8_t> dtypes;          // [P]
  std::vector<int64_t> groups;         // [P]
  std::vector<Chunk> chunks;           // ordered by group, then tensor, then offset
  std::vector<int64_t> group_offsets;  // [G + 1] into chunks
};

// Build the chunk list (grouped, in tensor order) for tensors of ``numel`` elements.
void plan_chunks(Plan& plan, const std::vector<int64_t>& numel, int64_t chunk_elems);

// CPU: gram -> out [G, K, K] fp32; combine -> out_ptrs[p] = sum_k w[g,k] g_k[p] (+ out).
void gram_cpu(const Plan& plan, float* out);
void combine_cpu(const Plan& plan, const float* weights, const std::vector<void*>& out_ptrs,
                 const std::vector<int8_t>& out_dtypes, bool accumulate);

}  // namespace megalora
