#include "native.h"

namespace mmgen {

BuildInfo build_info() {
  return BuildInfo{
      MMGEN_VERSION,
      MMGEN_CXX_COMPILER,
      MMGEN_WITH_CUDA != 0,
      {MMGEN_CUDA_ARCH_LIST},
      MMGEN_CUDA_TOOLKIT,
  };
}

}  // namespace mmgen
