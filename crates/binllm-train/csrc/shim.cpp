// The libtorch calls tch 0.24 does not expose. Each returns 0 on success or a malloc'd
// error message the Rust side frees with binllm_free_error.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/DeviceAccelerator.h>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {
char *copy_message(const char *msg) {
  char *out = static_cast<char *>(std::malloc(std::strlen(msg) + 1));
  std::strcpy(out, msg);
  return out;
}

std::vector<at::Tensor> gather(at::Tensor **items, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*items[i]);
  return out;
}
}  // namespace

extern "C" {

void binllm_free_error(char *msg) { std::free(msg); }

// tch can only switch autocast on at fp16; training wants bf16 on CUDA.
char *binllm_set_autocast_bf16() {
  try {
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
    return nullptr;
  } catch (const std::exception &e) {
    return copy_message(e.what());
  }
}

// Enters CUDA autocast through the per-device API (tch's autocast uses the deprecated
// device-less calls, which warn on every step). Returns whether it was on before.
bool binllm_autocast_enter() {
  bool was_enabled = at::autocast::is_autocast_enabled(at::kCUDA);
  at::autocast::set_autocast_enabled(at::kCUDA, true);
  at::autocast::increment_nesting();
  return was_enabled;
}

// Leaves autocast; the cast-weight cache is dropped when the outermost region ends, as
// torch.autocast does.
void binllm_autocast_exit(bool was_enabled) {
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(at::kCUDA, was_enabled);
}

// One fused AdamW step over all parameters (the kernel PyTorch's `fused=True` uses).
char *binllm_fused_adamw(at::Tensor **params, at::Tensor **grads, at::Tensor **exp_avgs,
                         at::Tensor **exp_avg_sqs, at::Tensor **steps, size_t n, double lr,
                         double beta1, double beta2, double weight_decay, double eps) {
  try {
    auto p = gather(params, n), g = gather(grads, n), m = gather(exp_avgs, n),
         v = gather(exp_avg_sqs, n), s = gather(steps, n);
    std::vector<at::Tensor> no_max;
    // As torch.optim does: the kernel reads the already-incremented step for bias correction.
    at::_foreach_add_(s, 1);
    at::_fused_adamw_(p, g, m, v, no_max, s, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    return nullptr;
  } catch (const std::exception &e) {
    return copy_message(e.what());
  }
}

// Drops gradients instead of zeroing them: saves a memset per parameter per step.
void binllm_set_grads_to_none(at::Tensor **params, size_t n) {
  for (size_t i = 0; i < n; ++i) params[i]->mutable_grad().reset();
}

// Peak bytes allocated by the accelerator's caching allocator since the last reset.
int64_t binllm_accelerator_peak_bytes(int device_index) {
  try {
    auto stats = at::accelerator::getDeviceStats(static_cast<c10::DeviceIndex>(device_index));
    return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
  } catch (const std::exception &) {
    return -1;
  }
}

void binllm_accelerator_reset_peak(int device_index) {
  try {
    at::accelerator::resetPeakStats(static_cast<c10::DeviceIndex>(device_index));
  } catch (const std::exception &) {
  }
}
}
