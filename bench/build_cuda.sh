#!/usr/bin/env bash
# Builds `--features cuda` on a machine without the CUDA toolkit or a GPU: NVIDIA's pip wheels
# bring nvcc (candle's kernels are compiled to PTX at build time) and the libraries to link
# against; the driver library, which only a GPU machine has, is replaced at link time by a stub
# that names the driver functions cudarc calls. The binaries then run wherever an NVIDIA driver
# and CUDA 13 libraries are installed (libcublas.so.13, libcublasLt.so.13, libcudart.so.13,
# libcurand.so.10 on the library path).
#
#   bench/build_cuda.sh            # target/cuda/release/rudolph and the GPU parity tests
#   PACK=1 bench/build_cuda.sh     # also .devpack/pack.tar.xz: binaries + fixtures, for bench/gpu.sh
#
# With the toolkit installed (nvcc on PATH, libcuda present), plain
# `cargo build --release --features cuda` does the same.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${RUDOLPH_CUDA_CACHE:-$HOME/.cache/rudolph-cuda}
root=$cache/nvidia/cu13
cap=${CUDA_COMPUTE_CAP:-90}

if [ ! -x "$root/bin/nvcc" ] || [ ! -x "$root/nvvm/bin/cicc" ]; then
  mkdir -p "$cache/wheels"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 -d "$cache/wheels" \
    'nvidia-cuda-nvcc==13.0.*' 'nvidia-nvvm==13.0.*' 'nvidia-cuda-crt==13.0.*' \
    'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-cccl==13.0.*' 'nvidia-cuda-nvrtc==13.0.*' \
    'nvidia-cublas==13.0.*' 'nvidia-curand'
  for w in "$cache"/wheels/*.whl; do python3 -m zipfile -e "$w" "$cache"; done
  chmod +x "$root"/bin/* "$root"/nvvm/bin/*
fi

# Unversioned names for the linker, and the driver stub (soname libcuda.so.1, as the driver's).
for l in cublas cublasLt nvrtc cudart; do ln -sf "lib$l.so.13" "$root/lib/lib$l.so"; done
ln -sf libcurand.so.10 "$root/lib/libcurand.so"
if [ ! -f "$root/lib/stubs/libcuda.so" ]; then
  cargo fetch --locked --quiet
  cudarc=$(find "${CARGO_HOME:-$HOME/.cargo}"/registry/src -maxdepth 2 -type d -name 'cudarc-*' | sort | tail -1)
  mkdir -p "$root/lib/stubs"
  grep -rho '\bfn cu[A-Za-z0-9_]*(' "$cudarc/src/driver/sys/" | sed 's/fn //; s/(//' | sort -u \
    | awk '{print "void " $1 "(void) {}"}' > "$cache/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" "$cache/cuda_stub.c"
fi

export CUDA_ROOT=$root CUDA_PATH=$root CUDA_COMPUTE_CAP=$cap
export PATH=$root/bin:$PATH LIBRARY_PATH=$root/lib:$root/lib/stubs
cargo build --release --locked --features cuda --target-dir target/cuda --bin rudolph
tests=$(cargo test --release --locked --features cuda --target-dir target/cuda --no-run \
  --test model --test pipelines --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])')
echo "built target/cuda/release/rudolph"
echo "$tests"

if [ "${PACK:-0}" = 1 ]; then
  fixtures=${RUDOLPH_FIXTURES:-$(cd .. && pwd)/shared/fixtures}
  stage=$(mktemp -d)
  cp target/cuda/release/rudolph "$stage/"
  while read -r name path; do cp "$path" "$stage/$name"; done <<< "$tests"
  strip "$stage"/*
  cp -r "$fixtures" "$stage/fixtures"
  rm -rf "$stage/fixtures/train_goldens"
  mkdir -p .devpack
  # One xz stream with a 64 MiB window: the three binaries share their embedded PTX.
  tar cf - -C "$stage" . | xz -9 -T1 > .devpack/pack.tar.xz
  rm -rf "$stage"
  ls -la .devpack/pack.tar.xz
fi
