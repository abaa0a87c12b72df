// The torch ops of specdec: few-row products and RMSNorm (module path), and the registration of
// the one-call forward of forward.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "forward.h"
#include "kernels.h"

namespace specdec {
namespace {

at::Tensor small_linear(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(), "small_linear: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "small_linear: weight must be a contiguous (N, K) matrix");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "small_linear: weight must be float32 or bfloat16");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(input.size(-1) == K, "small_linear: input has ", input.size(-1), " features, weight ", K);
  const at::Tensor x = input.reshape({-1, K}).to(at::kFloat).contiguous();  // (M, K)
  at::Tensor y = at::empty({x.size(0), N}, x.options());  // (M, N) float32
  product(x.data_ptr<float>(), x.size(0), weight, y.data_ptr<float>());
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = N;
  return y.to(input.scalar_type()).view(shape);
}

// RMSNorm of float32 rows, one op instead of the six torch's rms_norm runs on CPU.
at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "rms_norm: float32 only");
  const int64_t D = input.size(-1);
  TORCH_CHECK(weight.numel() == D, "rms_norm: weight has ", weight.numel(), " elements, input ", D);
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t rows = D ? x.numel() / D : 0;
  for (int64_t i = 0; i < rows; ++i)
    rms_norm_row(x.data_ptr<float>() + i * D, w.data_ptr<float>(), y.data_ptr<float>() + i * D, D,
                 static_cast<float>(eps));
  return y;
}

// Whether this thread's products round their rows to bfloat16 (kernels.h, t_bf16_rows); returns
// the previous setting. Has an effect only in builds with AVX512-BF16 (SPECDEC_BF16DOT).
bool set_bf16_rows(bool on) {
  const bool previous = t_bf16_rows;
  t_bf16_rows = on;
  return previous;
}

// Whether 1-2-row products of bfloat16 rows run on FMAs that give the dot products' bits
// (kernels.h, DotFmaStep): false where the build has no AVX512-BF16 or the CPU's sums differ.
bool bf16_fma_twin() {
#ifdef SPECDEC_BF16DOT
  return dot_matches_fma();
#else
  return false;
#endif
}

}  // namespace
}  // namespace specdec

TORCH_LIBRARY(specdec, m) {
  m.def("set_bf16_rows(bool on) -> bool", &specdec::set_bf16_rows);
  m.def("bf16_fma_twin() -> bool", &specdec::bf16_fma_twin);
  m.def("small_linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def("rms_norm(Tensor input, Tensor weight, float eps) -> Tensor");
  m.def(
      "decoder_layers(Tensor h, Tensor pos, Tensor inv_freq, Tensor k_cache, Tensor v_cache, Tensor slots, "
      "Tensor? mask, int kv_len, int begin, int end, Tensor?[] weights, int H, int Hkv, int D, "
      "float eps) -> Tensor");
  m.def(
      "model_forward(Tensor tokens, Tensor pos, Tensor inv_freq, Tensor embed, Tensor k_cache, Tensor v_cache, "
      "Tensor slots, Tensor? mask, int kv_len, Tensor?[] weights, Tensor norm, Tensor lm_head, int num_logits, "
      "int H, int Hkv, int D, float eps) -> (Tensor, Tensor)");
  m.def(
      "draft_greedy(Tensor tokens, int start, int K, Tensor inv_freq, Tensor embed, Tensor k_cache, Tensor v_cache, "
      "Tensor?[] weights, Tensor norm, Tensor lm_head, Tensor? ids, int H, int Hkv, int D, float eps) -> Tensor");
  m.def(
      "draft_sample(Tensor tokens, int start, int K, Tensor inv_freq, Tensor embed, Tensor k_cache, Tensor v_cache, "
      "Tensor?[] weights, Tensor norm, Tensor lm_head, Tensor? ids, Tensor uniforms, float temperature, int top_k, "
      "float top_p, int H, int Hkv, int D, float eps) -> (Tensor, Tensor)");
  m.def(
      "eagle_greedy(Tensor tokens, Tensor features, int start, int K, Tensor inv_freq, Tensor embed, Tensor fc, "
      "Tensor k_cache, Tensor v_cache, Tensor?[] weights, Tensor lm_head, Tensor? ids, int H, int Hkv, int D, "
      "float eps) -> Tensor");
  m.def(
      "eagle_sample(Tensor tokens, Tensor features, int start, int K, Tensor inv_freq, Tensor embed, Tensor fc, "
      "Tensor k_cache, Tensor v_cache, Tensor?[] weights, Tensor lm_head, Tensor? ids, Tensor uniforms, "
      "float temperature, int top_k, float top_p, int H, int Hkv, int D, float eps) -> (Tensor, Tensor)");
  m.def(
      "exit_greedy(Tensor tokens, int start, int K, Tensor inv_freq, Tensor embed, Tensor k_cache, Tensor v_cache, "
      "Tensor?[] weights, int num_layers, Tensor exit_norm, Tensor exit_proj, Tensor lm_head, Tensor? ids, int H, "
      "int Hkv, int D, float eps) -> (Tensor, Tensor)");
  m.def(
      "exit_sample(Tensor tokens, int start, int K, Tensor inv_freq, Tensor embed, Tensor k_cache, Tensor v_cache, "
      "Tensor?[] weights, int num_layers, Tensor exit_norm, Tensor exit_proj, Tensor lm_head, Tensor? ids, "
      "Tensor uniforms, float temperature, int top_k, float top_p, int H, int Hkv, int D, float eps) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(specdec, CPU, m) {
  m.impl("small_linear", &specdec::small_linear);
  m.impl("rms_norm", &specdec::rms_norm);
  m.impl("decoder_layers", &specdec::decoder_layers);
  m.impl("model_forward", &specdec::model_forward);
  m.impl("draft_greedy", &specdec::draft_greedy);
  m.impl("draft_sample", &specdec::draft_sample);
  m.impl("eagle_greedy", &specdec::eagle_greedy);
  m.impl("eagle_sample", &specdec::eagle_sample);
  m.impl("exit_greedy", &specdec::exit_greedy);
  m.impl("exit_sample", &specdec::exit_sample);
}
