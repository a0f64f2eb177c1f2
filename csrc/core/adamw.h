// Fused AdamW step over flat host buffers: the optimizer update of the CPU tier.
//
// One pass per element reads the gradient (fp32, or bf16 upcast), the fp32 master weight and both
// Adam moments, writes back all three and, optionally, the bf16 wire copy of the new weight
// (round to nearest even). With a bf16 gradient and a wire copy that is 28 bytes of memory traffic
// per parameter, where torch needs three passes (upcast, fused AdamW, downcast).
//
// The math is torch's fused CPU AdamW (aten/src/ATen/native/cpu/FusedAdamKernel.cpp, ADAMW mode,
// no amsgrad, no maximize) rounding step for rounding step, so results match torch._fused_adamw_
// bit for bit; see adamw.cpp for the one place torch disagrees with itself.
#pragma once

#include <cstdint>

namespace offload {

enum class GradDtype { F32, BF16 };

struct AdamWParams {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  // The step being taken, already incremented: 1 on the first update. Drives the bias correction.
  int64_t step = 1;
  // Multiplies the upcast gradient before anything else (the gradient-clipping coefficient).
  float grad_scale = 1.0f;
};

// Updates n elements in place. grad points at n floats (F32) or n bf16 bit patterns (BF16);
// wire_bf16 may be null (no wire copy). The buffers must not overlap. threads <= 1 runs on the
// calling thread; otherwise n is split into contiguous 64-element-aligned chunks, one std::thread
// each (fewer when n is small), joined before returning. Results do not depend on threads.
// Throws std::invalid_argument for n < 0, step < 1 or a null buffer (other than wire_bf16).
void adamw_step(float* param, float* exp_avg, float* exp_avg_sq, const void* grad, GradDtype grad_dtype,
                uint16_t* wire_bf16, int64_t n, const AdamWParams& p, int threads);

}  // namespace offload
