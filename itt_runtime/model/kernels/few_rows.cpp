// A matmul of a few rows on weights laid out in panels of 16 output features:
// itt_kernels::few_rows_linear(x (M, K), panels (N / 16, K, 16)) = x @ W^T, (M, N) fp32.
//
// Each panel (16 output features, all K inputs, contiguous) is read from memory once and
// multiplied into up to six rows at a time, their 12 accumulators held in AVX2 registers;
// the panels are split between torch's intra-op threads. For 2-8 rows this reads the
// weights once where MKL repacks them on every call and oneDNN pays a fixed cost per call
// (model/packed_linear.py has the figures).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

namespace {

constexpr int kPanel = 16;      // output features per panel: two AVX2 vectors
constexpr int kMaxTileRows = 6; // 12 accumulators + 2 weight vectors + 1 broadcast <= 16 ymm

// out[i, 0:16] = sum_k x[i, k] * panel[k, 0:16] for the MR rows at x (row stride K) and
// out (row stride N).
template <int MR>
void tile(const float* x, int64_t K, const float* panel, float* out, int64_t N) {
  __m256 acc[MR][2];
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = _mm256_setzero_ps();
    acc[i][1] = _mm256_setzero_ps();
  }
  const float* w = panel;
  for (int64_t k = 0; k < K; ++k, w += kPanel) {
    const __m256 w0 = _mm256_loadu_ps(w);
    const __m256 w1 = _mm256_loadu_ps(w + 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 b = _mm256_broadcast_ss(x + i * K + k);
      acc[i][0] = _mm256_fmadd_ps(b, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(b, w1, acc[i][1]);
    }
  }
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

}  // namespace

TORCH_LIBRARY(itt_kernels, m) {
  m.def("few_rows_linear(Tensor x, Tensor panels) -> Tensor");
  m.impl("few_rows_linear", torch::kCPU, &few_rows_linear);
}
