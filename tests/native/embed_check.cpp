// A C++ program using the installed native library (libmmgen_native.a + include/mmgen), no Python:
// what a serving stack embedding the kernels links against. Prints the build, the CUDA devices it
// sees, and that a launcher's argument checks run (null pointers are refused before any launch).
#include <mmgen/native.h>

#include <cstdio>
#include <stdexcept>

int main() {
  const mmgen::BuildInfo info = mmgen::build_info();
  std::printf("version %s cuda %d\n", info.version.c_str(), info.cuda ? 1 : 0);
#if MMGEN_WITH_CUDA
  std::printf("devices %d\n", mmgen::cuda_device_count());
  try {
    mmgen::layer_norm(mmgen::kernels::LayerNormParams{}, mmgen::kernels::DType::kFloat16, true, false, 0);
    std::printf("layer_norm accepted null pointers\n");
    return 1;
  } catch (const std::invalid_argument& e) {
    std::printf("refused: %s\n", e.what());
  }
#endif
  return 0;
}
