// Matmuls on packed copies of a model's weights (model/packed_linear.py has the figures).
//
// itt_kernels::few_rows_linear(x (M, K), panels (N / 16, K, 16)) = x @ W^T, (M, N) fp32:
// each panel (16 output features, all K inputs, contiguous) is read from memory once and
// multiplied into up to six rows at a time, their 12 accumulators held in AVX2 registers;
// the panels are split between torch's intra-op threads (OpenMP: built with -fopenmp, or
// at::parallel_for runs on one thread). For 2-40 rows this reads the weights once where MKL
// repacks them on every call and oneDNN pays a fixed cost per call; for one row it read them
// faster than inductor's own loops.
//
// itt_kernels::packed_linear(x (..., K), weight (N, K)) = F.linear(x, weight), through the
// copies registered for ``weight`` (register_weight): the panels for 1 to few_rows rows,
// oneDNN's packed copy for more, the weight itself otherwise. It is a C++ operator so that a
// compiled step calls it without entering Python (a Python custom op cost about 30 µs a
// call, 41 calls in a verify step).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <shared_mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr int kPanel = 16;      // output features per panel: two AVX2 vectors
constexpr int kMaxTileRows = 6; // 12 accumulators + 2 weight vectors + 1 broadcast <= 16 ymm

// out[i, 0:16] = sum_k x[i, k] * panel[k, 0:16] for the MR rows at x (row stride K) and
// out (row stride N). The row loops are unrolled by the pragma: without it GCC kept the
// accumulators in registers but also stored all of them to the stack on every k, which made
// 4-6 rows 1.6-1.9x slower. (Splitting k over two or four sets of accumulators, for one to
// three rows, measured no faster at one row and slower at two and three.)
template <int MR>
void tile(const float* x, int64_t K, const float* panel, float* out, int64_t N) {
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = _mm256_setzero_ps();
    acc[i][1] = _mm256_setzero_ps();
  }
  const float* w = panel;
  for (int64_t k = 0; k < K; ++k, w += kPanel) {
    const __m256 w0 = _mm256_loadu_ps(w);
    const __m256 w1 = _mm256_loadu_ps(w + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 b = _mm256_broadcast_ss(x + i * K + k);
      acc[i][0] = _mm256_fmadd_ps(b, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(b, w1, acc[i][1]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(out + i * N, acc[i][0]);
    _mm256_storeu_ps(out + i * N + 8, acc[i][1]);
  }
}

torch::Tensor few_rows_linear(const torch::Tensor& x, const torch::Tensor& panels) {
  TORCH_CHECK(x.dim() == 2 && panels.dim() == 3 && panels.size(2) == kPanel,
              "few_rows_linear: x (M, K) and panels (N/16, K, 16) expected");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && panels.scalar_type() == torch::kFloat,
              "few_rows_linear: fp32 only");
  TORCH_CHECK(x.size(1) == panels.size(1), "few_rows_linear: inner sizes differ");
  const torch::Tensor xc = x.contiguous();
  const torch::Tensor pc = panels.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), NB = pc.size(0), N = NB * kPanel;
  torch::Tensor out = torch::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = pc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, NB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* panel = wp + b * K * kPanel;
      for (int64_t m = 0; m < M; m += kMaxTileRows) {
        const float* xr = xp + m * K;
        float* o = op + m * N + b * kPanel;
        switch (std::min<int64_t>(kMaxTileRows, M - m)) {
          case 1: tile<1>(xr, K, panel, o, N); break;
          case 2: tile<2>(xr, K, panel, o, N); break;
          case 3: tile<3>(xr, K, panel, o, N); break;
          case 4: tile<4>(xr, K, panel, o, N); break;
          case 5: tile<5>(xr, K, panel, o, N); break;
          default: tile<6>(xr, K, panel, o, N); break;
        }
      }
    }
  });
  return out;
}

// Calls of 1 to this many rows run few_rows_linear: packed_linear.FEW_ROWS, which sets it
// when it loads this file (set_few_rows).
std::atomic<int64_t> few_rows{8};

void set_few_rows(int64_t rows) {
  TORCH_CHECK(rows >= 1, "set_few_rows: at least one row");
  few_rows.store(rows);
}

// A dense weight's packed copies; either may be undefined.
struct Copies {
  std::vector<int64_t> shape;
  torch::Tensor panels;
  torch::Tensor onednn;
};

// The registry, keyed by the dense weight's data address. Never destroyed: an operator may
// still run while the process exits.
std::shared_mutex& registry_mutex() {
  static auto* mutex = new std::shared_mutex;
  return *mutex;
}

std::unordered_map<int64_t, Copies>& registry() {
  static auto* map = new std::unordered_map<int64_t, Copies>;
  return *map;
}

int64_t key_of(const torch::Tensor& weight) {
  return reinterpret_cast<int64_t>(weight.data_ptr());
}

void register_weight(const torch::Tensor& weight, const std::optional<torch::Tensor>& panels,
                     const std::optional<torch::Tensor>& onednn) {
  TORCH_CHECK(weight.dim() == 2, "register_weight: a weight (N, K) expected");
  if (panels) {
    TORCH_CHECK(panels->dim() == 3 && panels->size(0) * kPanel == weight.size(0) &&
                    panels->size(1) == weight.size(1) && panels->is_contiguous(),
                "register_weight: panels (N / 16, K, 16), contiguous, expected");
  }
  Copies copies{weight.sizes().vec(), panels.value_or(torch::Tensor()),
                onednn.value_or(torch::Tensor())};
  std::unique_lock<std::shared_mutex> lock(registry_mutex());
  registry()[key_of(weight)] = std::move(copies);
}

void forget_weight(int64_t key) {
  std::unique_lock<std::shared_mutex> lock(registry_mutex());
  registry().erase(key);
}

torch::Tensor onednn_linear(const torch::Tensor& x, const torch::Tensor& packed) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, packed, c10::IValue(), c10::IValue(std::string("none")),
                          c10::IValue(c10::List<std::optional<c10::Scalar>>()),
                          c10::IValue(std::string(""))};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& weight) {
  const int64_t K = x.size(-1);
  const int64_t rows = K == 0 ? 0 : x.numel() / K;
  Copies copies;
  if (rows > 0) {
    std::shared_lock<std::shared_mutex> lock(registry_mutex());
    const auto found = registry().find(key_of(weight));
    if (found != registry().end() && found->second.shape == weight.sizes().vec()) {
      copies = found->second;
    }
  }
  torch::Tensor out;
  const torch::Tensor flat = copies.shape.empty() ? x : x.reshape({rows, K});
  if (copies.panels.defined() && rows <= few_rows.load()) {
    out = few_rows_linear(flat, copies.panels);
  } else if (copies.onednn.defined() && rows > 1) {
    out = onednn_linear(flat.contiguous(), copies.onednn);
  } else {
    return at::linear(x, weight);
  }
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = weight.size(0);
  return out.view(shape);
}

}  // namespace

TORCH_LIBRARY(itt_kernels, m) {
  m.def("few_rows_linear(Tensor x, Tensor panels) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("register_weight(Tensor weight, Tensor? panels, Tensor? onednn) -> ()",
        &register_weight);
  m.def("forget_weight(int key) -> ()", &forget_weight);
  m.def("set_few_rows(int rows) -> ()", &set_few_rows);
  m.impl("few_rows_linear", torch::kCPU, &few_rows_linear);
  m.impl("packed_linear", torch::kCPU, &packed_linear);
}
