#!/usr/bin/env bash
# The GPU check: build from source, run the whole test suite on CUDA, compute-sanitizer on small
# CUDA cases, the benchmarks; writes a dated summary to $OUT (default bench/out).
#
#   bash bench/gpu_check.sh                 # all stages
#   bash bench/gpu_check.sh build test      # some stages: build test sanitize cli bench
#   BENCH_ARGS="--only norm --quick" bash bench/gpu_check.sh build bench
#   SANITIZE_TOOLS="racecheck synccheck" bash bench/gpu_check.sh sanitize  # some compute-sanitizer tools
#   bash bench/gpu_check.sh readme          # README.md's two commands on a fresh copy (see the stage)
#   SANITIZE_SCRIPTS=tests/sanitize_gating.py TEST_ARGS=tests/test_gating.py bash bench/gpu_check.sh build test sanitize
#
# Wheels missing on the GPU machine (nvidia-cutlass; liger-kernel as a benchmark peer) are taken
# from .whl/ when present (the device machine has no network).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
stages=${*:-build test sanitize cli bench}  # readme: on request only (it builds its own copy)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
# The GPU machine sets CC/CXX to a toolchain in /opt/gcc. An extension built with it loads and runs,
# but the first C++ exception it throws (any bad-argument error) kills the process with SIGSEGV
# (measured 2026-11-25; the system gcc of the same version works). Build with the system compiler.
unset CC CXX
export PYTHONUNBUFFERED=1
# HEAD, with "+N changed" when tracked files differ from it (an uncommitted tree, or a copy whose .git is
# older than its files): bench/common.py commit_id.
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
changed=$(git status --porcelain --untracked-files=no 2>/dev/null | wc -l)
[ "$changed" -gt 0 ] && commit="$commit+$changed changed"
export DOTS1_EXT_COMMIT=${DOTS1_EXT_COMMIT:-$commit}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
summary=$OUT/summary.md
{
  echo "# dots1_ext GPU check — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- commit: $DOTS1_EXT_COMMIT"
  echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
  echo "- torch: $(python3 -c 'import torch;print(torch.__version__, "CUDA", torch.version.cuda)')"
  echo "- nvcc: $(${CUDA_HOME}/bin/nvcc --version | tail -1)"
  echo
} >"$summary"
status=0
for stage in $stages; do
  t0=$(date +%s)
  case $stage in
    build)
      { echo "CC=${CC:-} CXX=${CXX:-}"; for c in ${CXX:-} c++ g++; do command -v $c >/dev/null && echo "$c: $($c -dumpfullversion 2>/dev/null) default CXX11 ABI: $(echo '#include <string>' | $c -x c++ -dM -E - 2>/dev/null | grep -o '_GLIBCXX_USE_CXX11_ABI [01]')"; done; } >"$OUT/compiler.log" 2>&1
      MAX_JOBS=${MAX_JOBS:-16} DOTS1_EXT_CUDA=1 DOTS1_EXT_CUDA_ARCHS=${DOTS1_EXT_CUDA_ARCHS:-90a} \
        python3 setup.py -q build_ext --inplace >>"$OUT/compiler.log" 2>&1
      rc=$?; mv "$OUT/compiler.log" "$OUT/build.log"; tail -5 "$OUT/build.log" ;;
    test)
      # One pytest process per test file: a crash in one file cannot hide the others' results.
      rc=0; : >"$OUT/tests.log"
      for f in ${TEST_ARGS:-tests/test_*.py}; do
        timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q --no-header -rfEs ${PYTEST_FLAGS:-} "$f" >>"$OUT/tests.log" 2>&1
        r=$?; [ $r -eq 0 ] || rc=$r
        echo "$f: rc=$r $(tail -1 "$OUT/tests.log")" | tee -a "$OUT/tests_by_file.log"
      done ;;
    sanitize)
      # memcheck on every script (without the caching allocator, so an access past a tensor's end is
      # outside any allocation); racecheck and synccheck (shared memory, barriers, clusters: gating,
      # permute/unpermute, the CUTLASS grouped GEMM, the norms' block reductions) on the same small
      # cases. One line per (script, tool) with its rc; each run is capped at SANITIZE_TIMEOUT s
      # (the scripts are seconds of GPU work; the sanitizer's start-up dominates).
      rc=0; : >"$OUT/sanitize_by_tool.log"
      for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
        for s in ${SANITIZE_SCRIPTS:-tests/sanitize_*.py}; do
          [ -f "$s" ] || continue
          t1=$(date +%s)
          echo "=== $tool $s" >>"$OUT/sanitize.log"
          if [ "$tool" = memcheck ]; then
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${SANITIZE_TIMEOUT:-180} compute-sanitizer --tool memcheck \
              --error-exitcode 9 python3 "$s" >>"$OUT/sanitize.log" 2>&1
          else  # racecheck / synccheck cost far more per launch: the scripts' small case set
            DOTS1_SANITIZE_SMALL=1 timeout ${SANITIZE_TIMEOUT:-180} compute-sanitizer --tool "$tool" --error-exitcode 9 \
              python3 "$s" >>"$OUT/sanitize.log" 2>&1
          fi
          r=$?; [ $r -eq 0 ] || rc=$r
          echo "$tool $s: rc=$r in $(( $(date +%s) - t1 )) s" | tee -a "$OUT/sanitize.log" "$OUT/sanitize_by_tool.log"
        done
      done ;;
    cli)
      # The main job as a newcomer runs it: the tiny default checkpoint, then random real-shape models;
      # each must PASS its parity check and print its decode step beside the replay of its graph.
      rc=0; : >"$OUT/cli.log"
      while read -r args; do
        [ -n "$args" ] || continue
        echo "=== python -m dots1_ext $args" >>"$OUT/cli.log"
        timeout ${CLI_TIMEOUT:-240} python3 -m dots1_ext $args >>"$OUT/cli.log" 2>&1
        r=$?; [ $r -eq 0 ] || rc=$r
        echo "python -m dots1_ext $args: rc=$r" | tee -a "$OUT/cli_by_run.log"
      done <<<"${CLI_RUNS:-"--device cuda
--device cuda --batch-size 4
--real-shape --layers 3
--real-shape --layers 8"}" ;;
    readme)
      # A new user's run: a copy of the tree as a clone has it (tracked and untracked-not-ignored files,
      # no build outputs; .whl/ beside it because this machine has no network), an empty checkpoint
      # cache, then README.md's two commands as written, with one change: the test command's pytest
      # part runs one process per test file, TEST_STREAMS files at a time (the slow files first), and
      # starts no file after README_DEADLINE s (those are listed as NOT RUN, for a second call:
      # TEST_ARGS picks the files; README_MAIN=0 skips the main command there). The whole suite takes
      # two 10-minute device calls: on the H200 machine (16 cores) 5 streams slowed each file ~1.5x
      # against 3 (test_attention_fused_qk 275 -> 418 s, test_cli past 420 s), so 3 is the default.
      rc=0; fresh=${FRESH_DIR:-/tmp/dots1_fresh}; rm -rf "$fresh"; mkdir -p "$fresh/.cache" "$OUT/readme_tests"
      git ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do
        [ -f "$f" ] && { mkdir -p "$fresh/$(dirname "$f")"; cp "$f" "$fresh/$f"; }
      done
      [ -d .whl ] && cp -r .whl "$fresh/.whl"
      main_cmd=$(awk '/^\*\*Run the main job/{f=1;next} f&&/^```/{if(++n==2)exit;next} f&&n==1' README.md)
      test_cmd=$(awk '/<!-- test-command -->/{f=1;next} f&&/^```/{if(++n==2)exit;next} f&&n==1' README.md)
      pytest_part="python -m pytest -q tests"
      install_part=${test_cmd% && $pytest_part}
      [ "$install_part" != "$test_cmd" ] || { echo "README test command does not end in '$pytest_part'"; rc=1; }
      # Offline, pip cannot resolve nvidia-cutlass's own requirements (cuda-python, scipy, ...; the
      # extension needs only its headers): PIP_NO_DEPS, as a user's pip with a network would not need.
      readme_env=(env -u PYTHONPATH -u CC -u CXX PIP_NO_INDEX=1 PIP_NO_DEPS=1 PIP_FIND_LINKS="$fresh/.whl"
                  DOTS1_EXT_CACHE="$fresh/.cache" PYTHONUNBUFFERED=1)
      log=$OUT/readme.log
      { echo "fresh copy of $DOTS1_EXT_COMMIT in $fresh: $(find "$fresh" -type f -not -path '*/.whl/*' | wc -l) files"
        echo "README main command: $main_cmd"; } >"$log"
      if [ "${README_MAIN:-1}" = 1 ]; then  # README_MAIN=0: the test command only (a second call on a tree)
        ( cd "$fresh" && "${readme_env[@]}" timeout ${MAIN_TIMEOUT:-400} bash -euo pipefail -c "$main_cmd" ) >>"$log" 2>&1
        r=$?; [ $r -eq 0 ] || rc=$r
        echo "README main command: rc=$r in $(( $(date +%s) - t0 )) s" | tee -a "$log" "$OUT/readme_by_step.log"
      fi
      ( cd "$fresh" && "${readme_env[@]}" bash -euo pipefail -c "$install_part" ) >>"$log" 2>&1
      r=$?; [ $r -eq 0 ] || rc=$r
      echo "README test command, install part: rc=$r" | tee -a "$log" "$OUT/readme_by_step.log"
      slow_first="test_attention_fused_qk test_cli test_bench test_compile test_moe_decode_int4 test_skinny_gemm
                  test_moe_decode test_distributed test_model test_attention test_grouped_gemm_int4 test_norm"
      files=()
      for n in $slow_first; do files+=("tests/$n.py"); done
      for f in tests/test_*.py; do [[ " ${files[*]} " == *" $f "* ]] || files+=("$f"); done
      if [ -n "${TEST_ARGS:-}" ]; then
        picked=(); for f in "${files[@]}"; do [[ " $TEST_ARGS " == *" $f "* ]] && picked+=("$f"); done; files=("${picked[@]}")
      fi
      deadline=$(( t0 + ${README_DEADLINE:-540} ))
      run_test_file() {
        local f=$1 t1; t1=$(date +%s)
        ( cd "$fresh" && "${readme_env[@]}" timeout ${TEST_TIMEOUT:-420} python -m pytest -q --no-header -rfEs "$f" ) \
          >"$OUT/readme_tests/$(basename "$f" .py).log" 2>&1
        local r=$?
        echo "$f rc=$r $(( $(date +%s) - t1 )) s: $(tail -1 "$OUT/readme_tests/$(basename "$f" .py).log")" >>"$OUT/readme_by_step.log"
        return $r
      }
      running=0
      for f in "${files[@]}"; do
        if [ "$(date +%s)" -ge "$deadline" ]; then echo "$f NOT RUN (deadline)" >>"$OUT/readme_by_step.log"; rc=1; continue; fi
        if [ $running -ge ${TEST_STREAMS:-3} ]; then wait -n || rc=1; running=$((running - 1)); fi
        run_test_file "$f" & running=$((running + 1))
      done
      while [ $running -gt 0 ]; do wait -n || rc=1; running=$((running - 1)); done
      cat "$OUT/readme_by_step.log" ;;
    bench)
      timeout ${BENCH_TIMEOUT:-300} python3 -m bench.run ${BENCH_ARGS:-} --json "$OUT/bench.json" --md "$OUT/bench.md" \
        >"$OUT/bench.log" 2>&1
      rc=$?; tail -5 "$OUT/bench.log" ;;
    *) echo "unknown stage $stage"; rc=2 ;;
  esac
  [ $rc -eq 0 ] || status=1
  echo "- stage $stage: rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$summary"
done
{
  echo
  [ -f "$OUT/readme_by_step.log" ] && { echo "## README.md's two commands on a fresh copy (tests: one process per file, ${TEST_STREAMS:-3} at a time)"; echo; echo '```'; cat "$OUT/readme_by_step.log"; echo '```'; echo; }
  [ -f "$OUT/tests_by_file.log" ] && { echo "## Tests (CUDA machine, one pytest process per file)"; echo; echo '```'; cat "$OUT/tests_by_file.log"; echo '```'; echo; }
  [ -f "$OUT/sanitize_by_tool.log" ] && { echo "## compute-sanitizer (rc per tool and script)"; echo; echo '```'; cat "$OUT/sanitize_by_tool.log"; echo '```'; echo; }
  [ -f "$OUT/sanitize.log" ] && { echo "### ERROR SUMMARY lines"; echo; echo '```'; grep -E "^=== |ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitize.log"; echo '```'; echo; }
  [ -f "$OUT/cli.log" ] && { echo "## The main job (python -m dots1_ext)"; echo; echo '```'; grep -E "^=== |^model:|^prefill:|^decode|^parity" "$OUT/cli.log"; echo '```'; echo; }
  [ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
} >>"$summary"
exit $status
