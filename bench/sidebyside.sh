#!/bin/bash
# JMP-S against the PyTorch reference on the same structures, in one run, one process per measurement (so
# each peak RSS is that batch's own), then the comparison appended to BENCHMARKS.md. From the project root:
#   REF=<reference build: ../shared/reference/README.md> bench/sidebyside.sh OUTDIR [HARNESS]
# HARNESS defaults to ../shared/reference. Extra project flags go in PROJECT_FLAGS (e.g. "--remat none");
# BATCHES="slabs" measures one batch only, PRECISIONS="float32" one precision only. PROJECT_BF16 is the
# project's bf16 mode (default "--precision bfloat16": bf16 products; "--dtype bfloat16": bf16 compute).
# REF_STEPS / REF_WARMUP: the reference's timed and warm-up steps (default 3 / 1; 1 / 0 for its peak RSS only).
set -uo pipefail
OUT=${1:?outdir}; HARNESS=$(cd "${2:-../shared/reference}" && pwd); mkdir -p "$OUT"
PY=${PY:-python}
REF_PATH=$REF/JMP/src:$HARNESS/shims:$HARNESS
PYTHONPATH=$REF_PATH "$REF/venv/bin/python" "$HARNESS/bench_reference.py" --dump "$OUT/structures.npz" || exit 1
timed() { /usr/bin/time -f "peak_rss_kb %M wall_s %e" -o "$OUT/$1.time" "${@:2}" > "$OUT/$1.log" 2> "$OUT/$1.err"
          echo "$1 rc=$?"; }
reference() { timed "$1" env PYTHONPATH=$REF_PATH "$REF/venv/bin/python" "$HARNESS/bench_reference.py" \
              --steps "${REF_STEPS:-3}" --warmup "${REF_WARMUP:-1}" --batches "${@:2}"; }
project() { timed "$1" env JAX_ENABLE_COMPILATION_CACHE=false "$PY" bench/sidebyside.py step "$OUT/structures.npz" \
            ${PROJECT_FLAGS:-} --batch "${@:2}"; }
for batch in ${BATCHES:-molecules slabs}; do
  for precision in ${PRECISIONS:-float32 bf16}; do
    case $precision in
      float32) reference "ref_f32.$batch" "$batch"
               project "proj_f32.$batch" "$batch" --precision float32 ;;
      bf16)    project "proj_bf16.$batch" "$batch" ${PROJECT_BF16:---precision bfloat16}
               reference "ref_bf16.$batch" "$batch" --autocast bfloat16 ;;
      *)       echo "unknown precision $precision (float32, bf16)"; exit 1 ;;
    esac
  done
done
"$PY" bench/sidebyside.py report "$OUT"
