// Queries of the CUDA runtime. cudart is linked statically, so these work (and report "no
// device") on machines without a driver.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "native.h"

namespace mmgen {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(err));
  }
}

}  // namespace

int cuda_runtime_version() {
  int version = 0;
  check(cudaRuntimeGetVersion(&version), "cudaRuntimeGetVersion");
  return version;
}

int cuda_device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    cudaGetLastError();  // clear the error so later runtime calls do not report it
    return 0;
  }
  check(err, "cudaGetDeviceCount");
  return count;
}

}  // namespace mmgen
