// The one-call forward of a Llama-family model on the CPU (forward.cpp).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace specdec {

at::Tensor decoder_layers(const at::Tensor& h, const at::Tensor& pos, const at::Tensor& inv_freq,
                          const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                          const c10::optional<at::Tensor>& mask, int64_t kv_len, int64_t begin, int64_t end,
                          const c10::List<c10::optional<at::Tensor>>& weights, int64_t H, int64_t Hkv, int64_t D,
                          double eps);

std::tuple<at::Tensor, at::Tensor> model_forward(
    const at::Tensor& tokens, const at::Tensor& pos, const at::Tensor& inv_freq, const at::Tensor& embed,
    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
    const c10::optional<at::Tensor>& mask, int64_t kv_len, const c10::List<c10::optional<at::Tensor>>& weights,
    const at::Tensor& norm, const at::Tensor& lm_head, int64_t num_logits, int64_t H, int64_t Hkv, int64_t D,
    double eps);

at::Tensor draft_greedy(const at::Tensor& tokens, int64_t start, int64_t K, const at::Tensor& inv_freq,
                        const at::Tensor& embed, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const c10::List<c10::optional<at::Tensor>>& weights, const at::Tensor& norm,
                        const at::Tensor& lm_head, const c10::optional<at::Tensor>& ids, int64_t H, int64_t Hkv,
                        int64_t D, double eps);

std::tuple<at::Tensor, at::Tensor> draft_sample(const at::Tensor& tokens, int64_t start, int64_t K,
                                                const at::Tensor& inv_freq, const at::Tensor& embed,
                                                const at::Tensor& k_cache, const at::Tensor& v_cache,
                                                const c10::List<c10::optional<at::Tensor>>& weights,
                                                const at::Tensor& norm, const at::Tensor& lm_head,
                                                const c10::optional<at::Tensor>& ids, const at::Tensor& uniforms,
                                                double temperature, int64_t top_k, double top_p, int64_t H,
                                                int64_t Hkv, int64_t D, double eps);

at::Tensor eagle_greedy(const at::Tensor& tokens, const at::Tensor& features, int64_t start, int64_t K,
                        const at::Tensor& inv_freq, const at::Tensor& embed, const at::Tensor& fc,
                        const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const c10::List<c10::optional<at::Tensor>>& weights, const at::Tensor& lm_head,
                        const c10::optional<at::Tensor>& ids, int64_t H, int64_t Hkv, int64_t D, double eps);

std::tuple<at::Tensor, at::Tensor> eagle_sample(
    const at::Tensor& tokens, const at::Tensor& features, int64_t start, int64_t K, const at::Tensor& inv_freq,
    const at::Tensor& embed, const at::Tensor& fc, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const c10::List<c10::optional<at::Tensor>>& weights, const at::Tensor& lm_head,
    const c10::optional<at::Tensor>& ids, const at::Tensor& uniforms, double temperature, int64_t top_k,
    double top_p, int64_t H, int64_t Hkv, int64_t D, double eps);

std::tuple<at::Tensor, at::Tensor> exit_greedy(const at::Tensor& tokens, int64_t start, int64_t K,
                                               const at::Tensor& inv_freq, const at::Tensor& embed,
                                               const at::Tensor& k_cache, const at::Tensor& v_cache,
                                               const c10::List<c10::optional<at::Tensor>>& weights,
                                               int64_t num_layers, const at::Tensor& exit_norm,
                                               const at::Tensor& exit_proj, const at::Tensor& lm_head,
                                               const c10::optional<at::Tensor>& ids, int64_t H, int64_t Hkv, int64_t D,
                                               double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> exit_sample(
    const at::Tensor& tokens, int64_t start, int64_t K, const at::Tensor& inv_freq, const at::Tensor& embed,
    const at::Tensor& k_cache, const at::Tensor& v_cache, const c10::List<c10::optional<at::Tensor>>& weights,
    int64_t num_layers, const at::Tensor& exit_norm, const at::Tensor& exit_proj, const at::Tensor& lm_head,
    const c10::optional<at::Tensor>& ids, const at::Tensor& uniforms, double temperature, int64_t top_k, double top_p,
    int64_t H, int64_t Hkv, int64_t D, double eps);

}  // namespace specdec
