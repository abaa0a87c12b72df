// The torch ops of the GGUF block formats (quant.h): the few-row product and the dequantizer.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "quant.h"
#include "quant_q8.h"

namespace specdec {
namespace {

// Checks the raw blocks of an (N, K) weight of GGML type `type`: a contiguous uint8 (or int8: 8-bit
// rows) CPU tensor of N * row_bytes bytes.
void check_blocks(const at::Tensor& blocks, int64_t type, int64_t N, int64_t K, const char* op) {
  TORCH_CHECK(blocks.device().is_cpu() && quant::is_blocks(blocks) && blocks.is_contiguous(), op,
              ": blocks must be a contiguous uint8 (or int8: 8-bit rows) CPU tensor");
  const int64_t bytes = quant::row_bytes(type, K);
  TORCH_CHECK(bytes >= 0, op, ": GGML type ", type, " has no kernel");
  TORCH_CHECK(K % quant::block_size(type) == 0, op, ": ", K, " columns are not whole blocks of ",
              quant::block_size(type));
  TORCH_CHECK(blocks.numel() == N * bytes, op, ": ", blocks.numel(), " bytes, an (", N, ", ", K,
              ") weight of this type has ", N * bytes);
}

// y (..., N) = input (..., K) @ W (N, K)^T (+ bias), W given as its GGUF blocks: as uint8, with
// float32 rows; as int8, with the rows quantized to 8 bits where the format has such a product
// (quant_q8.h).
at::Tensor quant_linear(const at::Tensor& input, const at::Tensor& blocks, int64_t type, int64_t N, int64_t K,
                        const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.device().is_cpu(), "quant_linear: CPU tensors only");
  TORCH_CHECK(input.size(-1) == K, "quant_linear: input has ", input.size(-1), " features, weight ", K);
  check_blocks(blocks, type, N, K, "quant_linear");
  const at::Tensor x = input.reshape({-1, K}).to(at::kFloat).contiguous();  // (M, K)
  at::Tensor y = at::empty({x.size(0), N}, x.options());                    // (M, N) float32
  const uint8_t* w = quant::block_bytes(blocks);
  quant::dispatch(type, [&](auto format) {
    quant::run_rows<decltype(format)>(quant::q8_rows(blocks), x.data_ptr<float>(), x.size(0), K, w, N, y.data_ptr<float>());
  });
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = N;
  return y.to(input.scalar_type()).view(shape);
}

// The (N, K) float32 weights the products multiply (blocks as quant_linear takes them).
at::Tensor quant_dequantize(const at::Tensor& blocks, int64_t type, int64_t N, int64_t K) {
  check_blocks(blocks, type, N, K, "quant_dequantize");
  at::Tensor out = at::empty({N, K}, at::TensorOptions().dtype(at::kFloat));  // (N, K)
  const uint8_t* w = quant::block_bytes(blocks);
  quant::dispatch(type, [&](auto format) {
    quant::dequantize_any<decltype(format)>(quant::q8_rows(blocks), w, N, K, out.data_ptr<float>());
  });
  return out;
}

// The blocks of an (N, K) weight in the quad layout of 8-bit rows (quant_q8.h; to_quads), or back
// in GGUF's layout; a copy, uint8.
at::Tensor quant_quads(const at::Tensor& blocks, int64_t type, int64_t N, int64_t K, bool to_quads) {
  check_blocks(blocks, type, N, K, "quant_quads");
  at::Tensor out = at::empty_like(blocks, at::TensorOptions().dtype(at::kByte));
  quant::dispatch(type, [&](auto format) {
    quant::convert_rows<decltype(format)>(quant::block_bytes(blocks), out.data_ptr<uint8_t>(), N, K, to_quads);
  });
  return out;
}

}  // namespace
}  // namespace specdec

TORCH_LIBRARY_FRAGMENT(specdec, m) {
  m.def("quant_linear(Tensor input, Tensor blocks, int type, int N, int K, Tensor? bias) -> Tensor",
        &specdec::quant_linear);
  m.def("quant_dequantize(Tensor blocks, int type, int N, int K) -> Tensor", &specdec::quant_dequantize);
  m.def("quant_quads(Tensor blocks, int type, int N, int K, bool to_quads) -> Tensor", &specdec::quant_quads);
}
