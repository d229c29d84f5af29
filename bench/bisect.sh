#!/bin/bash
# Find which commit made a whole training step slower: each commit's fxfuse in its own tree, each
# timed by today's bench_lora.py in its own process (one compile each, ~100-125 s at 4k on the 8B shape).
#
#   here:    bash bench/bisect.sh prepare 3851e97 f36bb40 9227654 HEAD   # trees in bisect/<commit>/
#   device:  run(command="bash bench/bisect.sh run")                     # trees travel: untracked, not ignored
#   here:    bash bench/bisect.sh clean                                  # before committing anything else
#
# run's env: SEQ (4096), VARIANT (fxfuse-offload), VT (150 s per process), BUDGET (570 s for all),
# BENCH_ARGS (extra bench_lora.py arguments; each tree compiles cold in its own Inductor cache by
# default: with --warm-cache two trees whose graphs and pass sources match could share compiled
# graphs, and a tree would then not be timed with its own compile),
# ORDER=reverse to run the trees last-first (a second call in the other order separates a code
# effect from a process-order one). Output: $OUT/bisect.jsonl (bench rows tagged with the commit),
# $OUT/bisect_log.txt, and a table at the end.
set -u
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  shift
  [ $# -ge 1 ] || { echo "usage: $0 prepare COMMIT..." >&2; exit 2; }
  rm -rf bisect && mkdir -p bisect
  for c in "$@"; do
    sha=$(git rev-parse --short "$c") || exit 1
    mkdir -p "bisect/$sha/bench"
    git archive "$sha" fxfuse | tar -x -C "bisect/$sha"
    cp bench/bench_lora.py "bisect/$sha/bench/"   # one harness for every tree
    echo "$sha $(git log -1 --format=%s "$sha" | cut -c1-90)" >> bisect/ORDER
  done
  cat bisect/ORDER; du -sh bisect ;;
run)
  OUT=${OUT:-/tmp/fxfuse_out}; mkdir -p "$OUT"
  [ -f bisect/ORDER ] || { echo "no bisect/ORDER: run '$0 prepare COMMIT...' first" >&2; exit 2; }
  order=$(cut -d' ' -f1 bisect/ORDER); [ "${ORDER:-}" = reverse ] && order=$(echo "$order" | tac)
  unset TRITON_INTERPRET; export PYTHONUNBUFFERED=1
  : > "$OUT/bisect.jsonl"
  for sha in $order; do
    left=$(( ${BUDGET:-570} - SECONDS )); t=$(( left < ${VT:-150} ? left : ${VT:-150} ))
    [ "$t" -lt 30 ] && { echo "{\"commit\": \"$sha\", \"skipped\": \"budget\"}" >> "$OUT/bisect.jsonl"; continue; }
    echo "[bisect t=${SECONDS}s] $sha (timeout ${t}s)" | tee -a "$OUT/bisect_log.txt"
    (cd "bisect/$sha" && PYTHONPATH=$PWD timeout -k 10 "$t" python3 bench/bench_lora.py "${VARIANT:-fxfuse-offload}" \
      "${SEQ:-4096}" --size 8b ${BENCH_ARGS:-}) 2>&1 | tee -a "$OUT/bisect_log.txt" | grep '^{' | sed -u "s/^{/{\"commit\": \"$sha\", /" >> "$OUT/bisect.jsonl"
    rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && echo "{\"commit\": \"$sha\", \"rc\": $rc}" >> "$OUT/bisect.jsonl"
  done
  python3 - "$OUT/bisect.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:  # a line that only starts like JSON (stderr interleaved)
        continue
    keys = ("tok_s", "step_s", "peak_gb", "step_times", "fwd_host_s", "bwd_host_s", "pinned_blocks", "skipped", "rc", "error", "oom")
    print(r["commit"], {k: r[k] for k in keys if k in r})
PY
  ;;
clean) rm -rf bisect ;;
*) echo "usage: $0 prepare COMMIT... | run | clean" >&2; exit 2 ;;
esac
