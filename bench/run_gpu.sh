#!/bin/bash
# The one driver for the GPU machine. From the repo root here:
#   run(command="bash bench/run_gpu.sh", carry=[".whl", ".site", ".peers"])
# Split the work across calls with env vars (one call may run 10 minutes), e.g.
#   run(command="STEPS='info tests gemm' bash bench/run_gpu.sh")
#   run(command="STEPS=lora VARIANTS='hf fxfuse-lora' bash bench/run_gpu.sh")
#   run(command="STEPS='peers unsloth' bash bench/run_gpu.sh", carry=[".whl", ".site", ".peers"])
#
# STEPS     any of: info tests gemm lora peers anchor unsloth   (default: info tests gemm lora)
# VARIANTS  bench_lora.py variants for 'lora'                  (default: hf compile fxfuse-lora fxfuse)
# PEERS     bench_peers.py variants for 'peers'                (default: liger)
# SEQS      sequence lengths                                   (default: 1024,4096,16384)
# SIZE      8b | 1b                                            (default: 8b)
# FRESH=1   one process per (variant, seq) instead of one per variant
# DYNAMIC   auto | static | dynamic (bench_lora.py --dynamic)  (default: auto)
# FXFUSE_LORA_GEMM=auto|triton|cublas   passed through to fxfuse's op
# FXFUSE_LORA_FP32_DOT=tf32x3|bf16x3     passed through (dot of bf16 activations with fp32 adapters)
# TESTS     pytest paths for 'tests'                           (default: tests/gpu tests/kernels)
#           (run with FXFUSE_AUTOTUNE=0: one config per kernel, so the fuzz shapes do not each autotune)
# BENCH_ARGS  extra bench_lora.py arguments;  VT  timeout per benchmark process (s, default 420)
# BUDGET    seconds this script may use in all (default 570): no step outlives it
# DRYRUN=1  CPU rehearsal of this script (tiny model, Triton interpreter, aot_eager); PY picks python
#
# Output: $OUT/bench.jsonl (every JSON result line), $OUT/log.txt (everything), $OUT/gpu_tests.txt.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fxfuse_out}
mkdir -p "$OUT"
JSONL=$OUT/bench.jsonl LOG=$OUT/log.txt
STEPS=${STEPS:-info tests gemm lora}
VARIANTS=${VARIANTS:-hf compile fxfuse-lora fxfuse}
PEERS=${PEERS:-liger}
SEQS=${SEQS:-1024,4096,16384}
SIZE=${SIZE:-8b}
DYNAMIC=${DYNAMIC:-auto}
VT=${VT:-420}
BUDGET=${BUDGET:-570}
BENCH_ARGS=${BENCH_ARGS:-}
GEMM_ARGS=${GEMM_ARGS:-}
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
if [ "${DRYRUN:-0}" = 1 ]; then
  export TRITON_INTERPRET=1 FXFUSE_BENCH_COMPILER=aot_eager
  SIZE=tiny SEQS=${DRY_SEQS:-32,48} BENCH_ARGS="$BENCH_ARGS --device cpu" GEMM_ARGS="$GEMM_ARGS --tiny --device cpu"
fi
[ -n "${FXFUSE_LORA_GEMM:-}" ] && export FXFUSE_LORA_GEMM
[ -n "${FXFUSE_LORA_FP32_DOT:-}" ] && export FXFUSE_LORA_FP32_DOT

log() { echo "[run_gpu $(date +%H:%M:%S) t=${SECONDS}s] $*" | tee -a "$LOG"; }
# Seconds a step may still take: its own cap, bounded by what is left of BUDGET.
left() { local cap=$1 rest=$((BUDGET - SECONDS)); [ "$rest" -lt "$cap" ] && cap=$rest; echo $((cap > 5 ? cap : 0)); }
want() { [[ " $STEPS " == *" $1 "* ]]; }
# run_py TAG CAP CMD...: run under a timeout, log everything, keep JSON lines (tagged with source=TAG).
run_py() {
  local tag=$1 t; t=$(left "$2"); shift 2
  if [ "$t" -le 0 ]; then log "SKIP $tag: budget spent"; echo "{\"source\": \"$tag\", \"skipped\": \"budget\"}" >> "$JSONL"; return; fi
  log "START $tag (timeout ${t}s): $*"
  # the benchmark's own exit status (pipefail would report grep's 1 when it printed no JSON line)
  timeout -k 10 "$t" "$@" 2>&1 | tee -a "$LOG" | grep --line-buffered '^{' | sed -u "s/^{/{\"source\": \"$tag\", /" >> "$JSONL"
  local rc=${PIPESTATUS[0]}
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "{\"source\": \"$tag\", \"timeout_s\": $t, \"cmd\": \"$*\"}" >> "$JSONL"
  elif [ $rc -ne 0 ]; then echo "{\"source\": \"$tag\", \"rc\": $rc, \"cmd\": \"$*\"}" >> "$JSONL"; fi
  log "END $tag rc=$rc"
}
# bench SCRIPT TAG VARIANT: one process for all SEQS, or one per seq with FRESH=1.
bench() {
  local script=$1 tag=$2 v=$3 s
  if [ "${FRESH:-0}" = 1 ]; then
    for s in ${SEQS//,/ }; do run_py "$tag" "$VT" "$PY" "$script" "$v" "$s" --size "$SIZE" --dynamic "$DYNAMIC" $BENCH_ARGS; done
  else
    run_py "$tag" "$VT" "$PY" "$script" "$v" "$SEQS" --size "$SIZE" --dynamic "$DYNAMIC" $BENCH_ARGS
  fi
}

log "steps: $STEPS | variants: $VARIANTS | peers: $PEERS | seqs: $SEQS | size: $SIZE | fresh: ${FRESH:-0} | dynamic: $DYNAMIC | lora_gemm: ${FXFUSE_LORA_GEMM:-auto}"

if want info; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
    "$PY" -c "import sys,torch,triton,transformers,peft;print('python',sys.version.split()[0],'torch',torch.__version__,'cuda',torch.version.cuda,'triton',triton.__version__,'transformers',transformers.__version__,'peft',peft.__version__)"
    git log --oneline -1 2>/dev/null; git status --short 2>/dev/null | head -20
  } 2>&1 | tee -a "$LOG"
fi

if want tests; then
  t=$(left ${TESTS_CAP:-240}); log "START tests (timeout ${t}s)"
  # tests/kernels defaults TRITON_INTERPRET to 1 when unset: 0 runs them compiled, on the GPU.
  FXFUSE_FAILURES=$OUT/gpu_test_failures.txt FXFUSE_AUTOTUNE=${FXFUSE_AUTOTUNE:-0} TRITON_INTERPRET=${TRITON_INTERPRET:-0} timeout -k 10 "$t" "$PY" -m pytest ${TESTS:-tests/gpu tests/kernels} -q ${PYTEST_ARGS:-} -p no:cacheprovider -p bench.pytest_instafail > "$OUT/gpu_tests.txt" 2>&1
  rc=$?; tail -5 "$OUT/gpu_tests.txt" | tee -a "$LOG"; log "END tests rc=$rc"
  echo "{\"source\": \"tests\", \"rc\": $rc, \"summary\": \"$(tail -1 "$OUT/gpu_tests.txt" | tr -d '"\\' | cut -c1-200)\"}" >> "$JSONL"
fi

want gemm && run_py gemm 240 "$PY" bench/lora_gemm.py $GEMM_ARGS

if want lora; then
  for v in $VARIANTS; do bench bench/bench_lora.py bench_lora "$v"; done
fi

if want peers; then
  if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -3 | tee -a "$LOG"
    for v in $PEERS; do PYTHONPATH=/tmp/site:$PYTHONPATH bench bench/bench_peers.py bench_peers "$v"; done
  else
    log "SKIP peers: no wheel in .whl/ (carry .whl)"
  fi
fi

# The peers' own unmodified anchor script (cross-check of bench_peers.py), if .peers/ was carried.
if want anchor; then
  if [ -f .peers/bench_lora_anchor.py ]; then
    ls .whl/*.whl > /dev/null 2>&1 && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -3
    for v in ${ANCHOR_VARIANTS:-hf liger}; do
      PYTHONPATH=/tmp/site:$PYTHONPATH run_py anchor "$VT" "$PY" .peers/bench_lora_anchor.py "$v" "$SEQS" "$SIZE"
    done
  else
    log "SKIP anchor: .peers/bench_lora_anchor.py missing (carry .peers)"
  fi
fi

if want unsloth; then
  if [ -d .site/unsloth ] && [ -f .peers/bench_unsloth_anchor.py ]; then
    if [ ! -f /tmp/llama8b/config.json ]; then
      t=$(left 240); log "START saving the random 8B model dir (timeout ${t}s)"
      PYTHONPATH=$PWD/.site:$PYTHONPATH timeout -k 10 "$t" "$PY" .peers/make_random_llama8b_dir.py /tmp/llama8b 2>&1 | tail -2 | tee -a "$LOG"
    fi
    PYTHONPATH=$PWD/.site:$PYTHONPATH run_py unsloth "$VT" "$PY" .peers/bench_unsloth_anchor.py /tmp/llama8b "$SEQS"
  else
    log "SKIP unsloth: needs .site/ (bash .peers/build_unsloth_site.sh here) and .peers/, both carried"
  fi
fi

log "done; results:"
"$PY" - "$JSONL" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")] if len(sys.argv) > 1 else []
for r in rows:
    if "seq" in r and "variant" in r:
        keys = ("tok_s", "peak_gb", "tflops", "tflops_4NT", "compile_s", "graphs", "graph_breaks",
                "lora_rewritten", "lora_candidates", "runtime_fallbacks", "checks_ok", "oom", "error")
        print(f"{r.get('source', ''):<12} {r['variant']:<12} seq {r['seq']:>6} " +
              " ".join(f"{k}={r[k]}" for k in keys if k in r)[:400])
    elif r.get("bench") == "lora_gemm_winner":
        print(f"gemm {r['dir']} {r['proj']:<8} M={r['M']:<6} winner={r['winner']:<7} triton={r['triton_ms']} "
              f"cublas={r['cublas_ms']} floor={r['floor_ms']}")
    elif r.get("bench") == "lora_numerics" or r.get("source") in ("tests",) or "skipped" in r or "timeout_s" in r or "rc" in r:
        print(json.dumps(r)[:300])
EOF
