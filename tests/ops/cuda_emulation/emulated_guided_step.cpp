// The CUDA kernels of csrc/guided_step.cu, compiled for the CPU emulation (emulator.h).
#define __CUDACC__ 1
#define FASTGUIDE_CUDA_EMULATION 1
#include "../../../csrc/guided_step.cu"
