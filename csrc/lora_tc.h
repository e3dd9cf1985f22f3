// Tensor-core (WMMA) kernels of the fused LoRA projection for fp16 / bf16 (lora_tc.cu).
// Same arguments and results as the SIMT kernels in lora.cu (see lora.h); lora.cu's entry
// points send fp16 / bf16 here and keep fp32 on the exact SIMT path.
#pragma once

#include "lora.h"

namespace stitchops {
namespace tc {

int lowrank_matmul(DType dtype, const LowRankMatmulArgs& args, void* stream);
int lora_backward(DType dtype, const LoraBackwardArgs& args, void* stream);

}  // namespace tc
}  // namespace stitchops
