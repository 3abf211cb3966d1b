# Sourced by the GPU scripts: puts the CUDA 13 libraries that the binaries link on the library
# path where the loader does not find them by itself (PyTorch's pip packages carry them too).
for lib in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10; do
  ldconfig -p 2>/dev/null | grep -q "$lib" && continue
  found=$(find /usr/local/nvidia /usr/local/cuda /usr/lib/x86_64-linux-gnu /opt -name "$lib" 2>/dev/null | head -1)
  [ -n "$found" ] && export LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
