// The emulated runtime's one non-inline definition (see include/cuda_runtime.h).
#include "cuda_runtime.h"

extern "C" {
__attribute__((visibility("default"))) long stitchops_emulated_launches = 0;
}
