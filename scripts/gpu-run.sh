#!/usr/bin/env bash
# Runs the staged GPU bundle on a machine with a GPU (no Rust needed).
# Staged by scripts/gpu-bundle as gpu-bundle/run.sh. From the repo root:
#
#   bash gpu-bundle/run.sh              tests on the GPU, then a quick bench pass
#   bash gpu-bundle/run.sh --sanitizer  the tests under compute-sanitizer (memcheck)
#   bash gpu-bundle/run.sh --racecheck  the tests under compute-sanitizer (racecheck)
#   bash gpu-bundle/run.sh --tests-only
#   bash gpu-bundle/run.sh --benches "backbone gemm"   those benches only (no tests)
#
# Logs are written to a scratch folder; at the end summary.md and
# logs.tar.gz (every log) are copied to $OUT when it is set (the device
# tool brings back at most 8 files). The summary table prints last.
# Tests run with GIF_FR_REQUIRE_GPU=1 (a missing GPU fails them rather than
# skipping) and GIF_FR_POISON=1 (outputs start as NaN, so unwritten elements
# show); benches time the GPU only (GIF_FR_BENCH_GPU_ONLY=1).
#
# The machine-readable result: every test binary's pass/fail, every bench
# case's median and spread, ptxas's registers and spills per kernel (tests/
# ptx.rs), the card and commit, merged by `gif-fr regress` into run.json;
# with a baseline for this card (baselines/<card>.json, from
# docs/gpu-runs/baselines/), the verdict goes into the summary and fails
# the kit when it fails (see docs/gpu.md).
set -u
kit_start=$(date +%s)
bundle=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d /tmp/gif-fr-gpu-run.XXXXXX)
# The binaries travel as one xz archive (scripts/gpu-bundle); unpack them.
here=$(mktemp -d /tmp/gif-fr-bundle.XXXXXX)
if ! tar -C "$here" -xJf "$bundle/payload.tar.xz" 2>/dev/null; then
  python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$bundle/payload.tar.xz" "$here" || {
    echo "cannot unpack $bundle/payload.tar.xz" >&2
    exit 1
  }
fi
cp "$bundle/COMMIT" "$here/COMMIT" 2>/dev/null
mode=${1:-all}
# Benches by priority (then any other); --benches NAMES runs NAMES only.
bench_list="head_scaling softmax_head gemm backbone code_head decode rowwise"
if [ "$mode" = "--benches" ]; then
  bench_list=${2:?--benches needs a list of bench names}
fi
export GIF_FR_REQUIRE_GPU=1 GIF_FR_POISON=1 GIF_FR_BENCH_GPU_ONLY=1 RUST_BACKTRACE=1
# NCCL for the NCCL tests (tests/distributed.rs): cudarc opens libnccl.so,
# but PyTorch's wheel and the runtime package ship libnccl.so.2 alone; link
# libnccl.so to the first found (docs/distributed.md, "Finding libnccl").
nccl_so=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null)
[ -n "$nccl_so" ] && [ -e "$nccl_so" ] || nccl_so=$(ldconfig -p 2>/dev/null | awk '/libnccl\.so\.2 /{print $NF; exit}')
if [ -n "$nccl_so" ] && [ -e "$nccl_so" ]; then
  mkdir -p "$here/nccl" && ln -sf "$nccl_so" "$here/nccl/libnccl.so"
  export LD_LIBRARY_PATH="$here/nccl${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
summary="$out/summary.md"
: > "$summary"
results="$out/results"
mkdir -p "$results"
export GIF_FR_RESULTS_DIR="$results" GIF_FR_COMMIT="$(head -n 1 "$here/COMMIT" 2>/dev/null)"
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
gpu_driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
# The baseline's name: the card's, lower case, spaces as dashes (nvidia-h100-80gb-hbm3).
card=$(echo "${gpu_name:-unknown}" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/-$//')
: > "$results/tests.tsv"

{
  echo "## gif-fr GPU run"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- commit: $(cat "$here/COMMIT" 2>/dev/null | tr '\n' ' ')"
  echo "- gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1)"
  echo "- mode: $mode"
  echo
} >> "$summary"

"$here/bin/gif-fr" info > "$out/info.log" 2>&1
sed 's/^/    /' "$out/info.log" >> "$summary"
echo >> "$summary"

# tests/cli.rs runs the gif-fr binary: the bundle's, not the build machine's path.
export GIF_FR_BIN="$here/bin/gif-fr"
total_failed=0
[ "$mode" = "--benches" ] || {
  echo "| test binary | result | passed | failed | seconds |"
  echo "|---|---|---|---|---|"
} >> "$summary"
for t in "$here"/tests/*; do
  [ "$mode" = "--benches" ] && break
  name=$(basename "$t")
  log="$out/test-$name.log"
  start=$(date +%s)
  if [ "$mode" = "--sanitizer" ] || [ "$mode" = "--racecheck" ]; then
    tool=memcheck
    [ "$mode" = "--racecheck" ] && tool=racecheck
    timeout 420 compute-sanitizer --tool $tool --error-exitcode 99 "$t" --test-threads=1 > "$log" 2>&1
  else
    timeout 240 "$t" --test-threads=4 > "$log" 2>&1
  fi
  rc=$?
  secs=$(( $(date +%s) - start ))
  passed=$(grep -Eo '[0-9]+ passed' "$log" | tail -n 1 | cut -d' ' -f1)
  failed=$(grep -Eo '[0-9]+ failed' "$log" | tail -n 1 | cut -d' ' -f1)
  result=ok
  [ "$rc" -ne 0 ] && result="FAILED (exit $rc)"
  [ "$rc" -ne 0 ] && total_failed=$((total_failed + 1))
  echo "| $name | $result | ${passed:-?} | ${failed:-?} | $secs |" >> "$summary"
  printf '%s\t%s\t%s\n' "$name" "$rc" "${failed:-?} failed" >> "$results/tests.tsv"
  if [ "$rc" -ne 0 ]; then
    { echo "$name:"; grep -E -A3 "panicked at|ERROR SUMMARY|^========= [A-Z]" "$log" | head -n 40; } \
      | sed 's/^/    /' >> "$summary.failures"
  fi
done
echo >> "$summary"

if [ "$mode" = "all" ] && [ -f "$bundle/check_insightface.py" ]; then
  # PyTorch's insightface iresnet -> .pth -> pth_to_safetensors.py -> gif-fr
  # embed (CPU and GPU, f32 and --bf16) against PyTorch's own embeddings.
  timeout 180 python3 "$bundle/check_insightface.py" --gif-fr "$here/bin/gif-fr" --work "$out/insightface" \
    > "$out/insightface.log" 2>&1
  rc=$?
  sed -n '/^### /,$p' "$out/insightface.log" >> "$summary"
  echo >> "$summary"
  if [ "$rc" -ne 0 ]; then
    total_failed=$((total_failed + 1))
    { echo "check_insightface.py (exit $rc):"; tail -n 20 "$out/insightface.log"; } | sed 's/^/    /' >> "$summary.failures"
  fi
fi

if [ "$mode" = "all" ] || [ "$mode" = "--benches" ]; then
  # The scaling study runs in its quick mode and writes its CSV and plot here.
  export GIF_FR_SCALING_QUICK=1 GIF_FR_SCALING_OUT="$out/scaling"
  # The backbone bench's quick subset; its CSV feeds torch_backbone.py.
  export GIF_FR_BACKBONE_QUICK=1 GIF_FR_BACKBONE_OUT="$out/backbone"
  # Most important first; no bench starts after GIF_FR_KIT_BUDGET seconds
  # (default 420) since the kit started, so one device call stays under 540 s.
  # PyTorch runs right after the bench it is compared with, in the same call.
  budget=${GIF_FR_KIT_BUDGET:-420}
  extra=$([ "$mode" = all ] && ls "$here/benches")
  for name in $bench_list $extra; do
    b="$here/benches/$name"
    [ -f "$b" ] || continue
    grep -qx "$name" "$out/.benched" 2>/dev/null && continue
    echo "$name" >> "$out/.benched"
    if [ $(( $(date +%s) - kit_start )) -gt "$budget" ]; then
      echo "bench $name: skipped (the kit's $budget s budget is spent)" >> "$summary"
      continue
    fi
    limit=150
    [ "$name" = head_scaling ] && limit=240
    CRITERION_HOME="$out/criterion" timeout $limit "$b" --bench --warm-up-time 0.3 --measurement-time 1 \
      > "$out/bench-$name.log" 2>&1 || echo "bench $name exited with $?" >> "$summary"
    sed -n '/^### /,$p' "$out/bench-$name.log" >> "$summary"
    echo >> "$summary"
    case "$name" in
      softmax_head) torch_script=torch_heads; torch_args="--quick --csv $out/scaling/torch_heads.csv" ;;
      backbone) torch_script=torch_backbone
        torch_args="--quick --ours $out/backbone/backbone.csv --csv $out/backbone/torch_backbone.csv" ;;
      *) torch_script= ;;
    esac
    if [ -n "$torch_script" ] && [ -f "$bundle/$torch_script.py" ]; then
      mkdir -p "$out/scaling" "$out/backbone"
      # shellcheck disable=SC2086
      timeout 150 python3 "$bundle/$torch_script.py" $torch_args > "$out/$torch_script.log" 2>&1 \
        || echo "$torch_script.py exited with $?" >> "$summary"
      sed -n '/^### /,$p' "$out/$torch_script.log" >> "$summary"
      echo >> "$summary"
    fi
  done
fi

# The run's result, and the verdict against this card's baseline.
python3 - "$results" "$gpu_name" "$gpu_driver" "$GIF_FR_COMMIT" <<'PY' 2>> "$out/results.log"
import json, sys
folder, device, driver, commit = sys.argv[1:5]
tests = []
for line in open(f"{folder}/tests.tsv"):
    name, rc, detail = line.rstrip("\n").split("\t")
    tests.append({"binary": name, "passed": rc == "0", "detail": None if rc == "0" else f"exit {rc}, {detail}"})
run = {"machine": {"device": device, "driver": driver or None, "commit": commit or None}, "tests": tests}
json.dump(run, open(f"{folder}/tests.json", "w"), indent=1)
PY
baseline="$bundle/baselines/$card.json"
verdict_args=(--run "$results"/*.json --write-run "$out/run.json")
[ -f "$baseline" ] && verdict_args+=(--baseline "$baseline")
{
  echo "### regression verdict ($card)"
  echo
  [ -f "$baseline" ] || echo "no baseline for $card yet: run.json is the candidate (docs/gpu.md says how to store it)"
  "$here/bin/gif-fr" regress "${verdict_args[@]}" 2>&1 | sed 's/^/    /'
  echo
} >> "$summary"
if [ -f "$baseline" ] && ! "$here/bin/gif-fr" regress "${verdict_args[@]}" > /dev/null 2>&1; then
  total_failed=$((total_failed + 1))
fi

if [ -f "$summary.failures" ]; then
  { echo "### failures"; echo; cat "$summary.failures"; echo; } >> "$summary"
fi
echo "failed (test binaries and checks): $total_failed" >> "$summary"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$summary" "$OUT/summary$( [ "$mode" = all ] || echo "${mode#--}" | sed 's/^/-/').md"
  tar czf "$OUT/logs$( [ "$mode" = all ] || echo "${mode#--}" | sed 's/^/-/').tar.gz" -C "$out" --exclude criterion .
  # At most 8 files come back: the identification CSV stays in the logs.
  [ -f "$out/run.json" ] && cp "$out/run.json" "$OUT/run$( [ "$mode" = all ] || echo "${mode#--}" | sed 's/^/-/').json"
  for f in results.csv time_vs_n.svg torch_heads.csv; do
    [ -f "$out/scaling/$f" ] && cp "$out/scaling/$f" "$OUT/scaling-$f"
  done
  for f in backbone.csv torch_backbone.csv; do
    [ -f "$out/backbone/$f" ] && cp "$out/backbone/$f" "$OUT/$f"
  done
fi
cat "$summary"
[ "$total_failed" -eq 0 ]
