#!/usr/bin/env bash
# One call on a lent GPU (see ../shared/GPU.md): build the CUDA extension in place, run the GPU
# tests, the per-kernel benchmark and the end-to-end benchmarks against their peers (captioning,
# text-to-image, detokenizers, speech-to-gesture) in the same run, and print the tables last. Full
# logs and JSON go to $OUT (or build/gpu_check).
# Budget: about 12 minutes on an H100/H200 for every stage (each has its own timeout), more than one
# device command may run: pick stages with STAGES (default all), e.g. two calls
#   STAGES="pytest sanitizer kernels" bash benchmarks/gpu_check.sh
#   STAGES="caption" bash benchmarks/gpu_check.sh
#   STAGES="txt2img gesture" bash benchmarks/gpu_check.sh
# (the build runs every time; on a warm machine it is quick). Stages: pytest sanitizer kernels caption
# txt2img gesture, and, not in the default list: caption_cuda, the ViT-GPT2 benchmark with the CUDA
# kernels selected for the ops that have them; caption_vlm, LLaVA-1.5-7B (bf16) and BLIP-2 OPT-2.7B
# (fp16) shapes against transformers (up to 13 minutes the first time: the random models are built); engine, the serving benchmark (bench_engine.py: mm.Engine's
# continuous batching against static batching and one request at a time under Poisson arrivals, the
# demo models, up to 7 minutes); beam, beam search K = 3 and 5 vs transformers and vs K greedy rows
# (bench_beam.py, ViT-B/16 + GPT-2 small, fp16, about 2 minutes); serving, the HTTP load test
# (bench_serving.py: `mmgen serve` against a ten-line FastAPI app calling the pipeline behind a lock,
# Poisson arrivals over loopback, the demo models, up to 6 minutes; needs fastapi, uvicorn, httpx
# and prometheus-client, installed from wheels carried in build/serving_wheels when missing), e.g.
#   STAGES="engine beam" bash benchmarks/gpu_check.sh
# onnx (not in the default list): ONNX Runtime's CUDA execution provider inside the engine (its GPU
# test: I/O binding on torch's memory and stream, ORT's CUDA graphs) and bench_onnx.py's stages and
# captioning end to end against the engine, fp16 and fp32, about 5 minutes; needs onnxruntime-gpu,
# onnx and onnxscript, installed from wheels carried in build/onnx_wheels when missing, e.g.
#   STAGES="onnx" bash benchmarks/gpu_check.sh
# `sanitizer` runs the CUDA kernels' GPU tests under compute-sanitizer's memcheck
# (out-of-bounds and misaligned accesses, launch errors in csrc/kernels) at the test shapes.
#   usage: [STAGES="..."] bash benchmarks/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
QUICK="${1:-}"
export PYTHONUNBUFFERED=1
status=0
STAGES="${STAGES:-pytest sanitizer kernels caption txt2img gesture}"
step() { echo; echo "=== $1 ($(date +%T))"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }
show() { [ -f "$2" ] && sed -n "/^$1/,\$p" "$2"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/machine.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/machine.txt"

step "build (CUDA extension in place)"
# pip's editable install maps kernels/triton/ to mmgen_engine.kernels; --no-deps/--no-build-isolation:
# the machine has no network and already has torch
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1 \
  || { echo "build failed, see build.log"; tail -20 "$OUT/build.log"; exit 1; }
"$PY" -c "import mmgen_engine as mm, json; i = mm.build_info(); print(json.dumps({k: i[k] for k in ('version', 'cuda', 'cuda_archs', 'triton')}))"

if want pytest; then
step "pytest -m gpu"
timeout 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if want sanitizer; then
step "compute-sanitizer memcheck on the CUDA kernel tests"
SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)"
if [ -n "$SANITIZER" ]; then
  timeout 300 "$SANITIZER" --tool memcheck --error-exitcode 3 --print-limit 20 \
    "$PY" -m pytest -m gpu -q -p no:cacheprovider -k "not real_sizes" tests/test_kernels_cuda.py 2>&1 \
    | tee "$OUT/sanitizer.log" | tail -15
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
else
  echo "compute-sanitizer not found"; status=1
fi
fi

if want kernels; then
step "kernel benchmark"
timeout 150 "$PY" benchmarks/bench_kernels.py ${QUICK:+--quick} --json "$OUT/bench_kernels.json" \
  >"$OUT/bench_kernels.log" 2>&1 || status=1
tail -5 "$OUT/bench_kernels.log"
fi

if want caption; then
step "captioning benchmark: engine vs transformers, ViT-B/16 + GPT-2 small, BLIP-base, GIT-base, fp16"
timeout 240 "$PY" benchmarks/bench_caption.py --arch vit-gpt2 blip git --device cuda --dtype float16 \
  --batch 1 16 --new-tokens 32 --repeats 5 --warmup 3 --cache-dir build/bench_caption \
  --json "$OUT/bench_caption.json" >"$OUT/bench_caption.log" 2>&1 || status=1
fi

if want caption_cuda; then
step "captioning benchmark with the CUDA kernels of csrc/ (decode attention, sampler, LayerNorms)"
MMGEN_BACKEND=decode_attention=cuda,sample=cuda,add_layer_norm=cuda,layer_norm=cuda \
timeout 150 "$PY" benchmarks/bench_caption.py --arch vit-gpt2 --device cuda --dtype float16 \
  --batch 1 16 --new-tokens 32 --repeats 5 --warmup 3 --cache-dir build/bench_caption \
  --json "$OUT/bench_caption_cuda.json" >"$OUT/bench_caption_cuda.log" 2>&1 || status=1
fi

if want caption_vlm; then
step "captioning benchmark: LLaVA-1.5-7B (bf16) and BLIP-2 OPT-2.7B (fp16) shapes vs transformers, random weights"
# building and converting the random 7B model takes a few minutes the first time (cached in build/)
timeout 480 "$PY" benchmarks/bench_caption.py --arch llava --device cuda --dtype bfloat16 \
  --batch 1 8 --new-tokens 32 --repeats 3 --warmup 2 --cache-dir build/bench_caption \
  --json "$OUT/bench_caption_llava.json" >"$OUT/bench_caption_llava.log" 2>&1 || status=1
timeout 300 "$PY" benchmarks/bench_caption.py --arch blip2 --device cuda --dtype float16 \
  --batch 1 8 --new-tokens 32 --repeats 3 --warmup 2 --cache-dir build/bench_caption \
  --json "$OUT/bench_caption_blip2.json" >"$OUT/bench_caption_blip2.log" 2>&1 || status=1
fi

if want engine; then
step "serving: mm.Engine vs static batching vs one at a time, Poisson arrivals, demo models"
# the sweeps are a guess for an H100/H200 (not yet run on one: widen them where a mode does not
# saturate); each mode skips the rates above two saturated ones
if [ -n "$QUICK" ]; then
  ENGINE_CAPTION=(--quick); ENGINE_OTHER=(--quick)
else
  ENGINE_CAPTION=(--rates 50 100 200 400 800 1600 --requests 800 --duration 3)
  ENGINE_OTHER=(--rates 2 5 10 20 40 80 --requests 200 --duration 4 --drain 8)
fi
timeout 240 "$PY" benchmarks/bench_engine.py --device cuda --tasks caption caption_forced "${ENGINE_CAPTION[@]}" \
  --json "$OUT/bench_engine.json" >"$OUT/bench_engine.log" 2>&1 || status=1
timeout 180 "$PY" benchmarks/bench_engine.py --device cuda --tasks txt2img gesture "${ENGINE_OTHER[@]}" \
  --json "$OUT/bench_engine_t2i_gesture.json" >"$OUT/bench_engine_t2i_gesture.log" 2>&1 || status=1
fi

if want beam; then
step "beam search: engine vs transformers, K = 3 and 5, and vs K greedy rows, ViT-B/16 + GPT-2 small, fp16"
timeout 300 "$PY" benchmarks/bench_beam.py --device cuda --dtype float16 $QUICK --json "$OUT/bench_beam.json" \
  >"$OUT/bench_beam.log" 2>&1 || status=1
fi

if want serving; then
step "serving over HTTP: mmgen serve vs a FastAPI app with the pipeline behind a lock, Poisson arrivals, demo models"
# the machine has no network: pip download fastapi uvicorn httpx prometheus-client python-multipart
# (and their dependencies) into build/serving_wheels on a CPU machine and carry it
if ls build/serving_wheels/* >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps --no-index --no-build-isolation build/serving_wheels/* >"$OUT/serving_wheels.log" 2>&1 \
    || tail -5 "$OUT/serving_wheels.log"
fi
if "$PY" -c "import fastapi, uvicorn, httpx, prometheus_client, multipart" 2>/dev/null; then
  # the sweeps are bench_serving.py's CUDA defaults, a guess (not yet run on a GPU); each mode skips
  # the rates above two saturated ones
  timeout 360 "$PY" benchmarks/bench_serving.py --device cuda $QUICK --log-dir "$OUT/serving" \
    --json "$OUT/bench_serving.json" >"$OUT/bench_serving.log" 2>&1 || status=1
else
  echo "fastapi, uvicorn, httpx, prometheus-client or python-multipart missing (see build/serving_wheels above)"
  status=1
fi
fi

if want onnx; then
step "ONNX Runtime (CUDA execution provider): its GPU test, then stages and captioning vs the engine"
# the machine has no network and only the CPU onnxruntime: pip download onnxruntime-gpu onnx onnxscript
# (and their dependencies, for the GPU machine's Python and CUDA) into build/onnx_wheels on a CPU
# machine and bring it along (onnxruntime-gpu alone is ~300 MB, more than the device tool carries in
# one call: it has to be on the machine's shared disk); the CPU onnxruntime goes first (both install
# the same module)
if ls build/onnx_wheels/* >/dev/null 2>&1; then
  "$PY" -m pip uninstall -q -y onnxruntime >/dev/null 2>&1
  "$PY" -m pip install -q --no-deps --no-index --no-build-isolation build/onnx_wheels/* >"$OUT/onnx_wheels.log" 2>&1 \
    || tail -5 "$OUT/onnx_wheels.log"
fi
if "$PY" -c "import onnxruntime as o, onnx, onnxscript; assert 'CUDAExecutionProvider' in o.get_available_providers()" \
    2>/dev/null; then
  timeout 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_onnx_backend.py tests/test_onnx_export.py 2>&1 \
    | tee "$OUT/pytest_onnx_gpu.log" | tail -5
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  timeout 300 "$PY" benchmarks/bench_onnx.py --device cuda --arch vit-gpt2 blip git --e2e-arch vit-gpt2 \
    --batch 1 16 --repeats 10 $QUICK --cache-dir build/bench_onnx \
    --json "$OUT/bench_onnx.json" >"$OUT/bench_onnx.log" 2>&1 || status=1
else
  echo "onnxruntime-gpu (with its CUDA provider), onnx or onnxscript missing (see build/onnx_wheels above)"
  status=1
fi
fi

if want txt2img; then
step "text-to-image: engine vs min-dalle, DALL-E Mini size, random weights, fp16"
# min-dalle, dall-e and taming ship as wheels carried in build/upstream_wheels (the machine has no
# network): pip download --no-deps min-dalle==0.4.11 dall-e==0.1 taming-transformers==0.0.1 emoji attrs
if ls build/upstream_wheels/* >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps --no-index --no-build-isolation build/upstream_wheels/* >"$OUT/upstream.log" 2>&1 \
    || tail -5 "$OUT/upstream.log"
fi
timeout 240 "$PY" benchmarks/bench_txt2img.py --device cuda --dtype float16 --grid 4 --repeats 3 \
  --cache-dir build/bench_txt2img --json "$OUT/bench_txt2img.json" >"$OUT/bench_txt2img.log" 2>&1 || status=1
timeout 90 "$PY" benchmarks/bench_detok.py --device cuda --json "$OUT/bench_detok.json" \
  >"$OUT/bench_detok.log" 2>&1 || status=1
fi

if want gesture; then
step "speech-to-gesture: engine vs the plain PyTorch a2g-gpt, demo size, random weights, fp16, 60 s of audio"
timeout 120 "$PY" benchmarks/bench_gesture.py --device cuda --dtype float16 --seconds 60 \
  --json "$OUT/bench_gesture.json" >"$OUT/bench_gesture.log" 2>&1 || status=1
fi

step "results"
show "kernel benchmark" "$OUT/bench_kernels.log"
show "caption benchmark" "$OUT/bench_caption.log"
[ -f "$OUT/bench_caption_cuda.log" ] && echo "--- the same with the CUDA kernels (caption_cuda):" \
  && show "caption benchmark" "$OUT/bench_caption_cuda.log"
show "caption benchmark" "$OUT/bench_caption_llava.log"
show "caption benchmark" "$OUT/bench_caption_blip2.log"
show "txt2img benchmark" "$OUT/bench_txt2img.log"
show "detok" "$OUT/bench_detok.log"
show "gesture benchmark" "$OUT/bench_gesture.log"
show "engine benchmark" "$OUT/bench_engine.log"
show "engine benchmark" "$OUT/bench_engine_t2i_gesture.log"
[ -f "$OUT/bench_beam.log" ] && tail -20 "$OUT/bench_beam.log"
show "serving benchmark" "$OUT/bench_serving.log"
show "onnx benchmark" "$OUT/bench_onnx.log"
grep -E "WARNING|FAILED|Error" "$OUT"/bench_*.log 2>/dev/null | head -10
[ -f "$OUT/pytest_gpu.log" ] && grep -E "passed|failed" "$OUT/pytest_gpu.log" | tail -1
[ -f "$OUT/sanitizer.log" ] && grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer.log" | tail -2
echo "gpu_check status $status"
exit $status
