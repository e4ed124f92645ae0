// The CUDA kernels of csrc/layer_norm.cu, compiled for the CPU emulation (emulator.h).
#define __CUDACC__ 1
#define FASTGUIDE_CUDA_EMULATION 1
#include "../../../csrc/layer_norm.cu"
