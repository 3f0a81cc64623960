#!/usr/bin/env bash
# `make test`: the whole suite, each step timed into _build/timing/ (tools/timing.py).
#   1. create or check .venv            4. build the site from the committed notebooks (-W -n)
#   2. calibrate the machine            5. every notebook under nbval, two at a time
#   3. unit and kernel tests, two workers  6. the timing record, then one closing line
# Two pytest workers with one thread each: MINI_THREADS / OMP_NUM_THREADS = 1 and MINI_CPUS = 1
# (the cores a notebook may use), so nothing oversubscribes the two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
START=${MAKE_START:-$(date +%s.%N)}
BIN=.venv/bin
JOBS=${MINI_JOBS:-2}
now() { date +%s.%N; }
since() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$1" "$(now)"; }

t=$(now); [ -x $BIN/python ] || export MINI_FRESH_VENV=1
make --no-print-directory venv; venv_s=$(since "$t")
mkdir -p _build/timing && rm -f _build/timing/{calibration,unit,notebooks,timing}.json
t=$(now); $BIN/python tools/timing.py calibrate; calibrate_s=$(since "$t")

export MINI_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MINI_CPUS=$(( $(nproc) / JOBS ))
[ "$MINI_CPUS" -ge 1 ] || MINI_CPUS=1
t=$(now); MINI_TIMING=unit $BIN/python -m pytest tests -q -n "$JOBS" -p tests.nbtiming; unit_s=$(since "$t")
t=$(now); $BIN/python tools/build_site.py; site_s=$(since "$t")
t=$(now); MINI_TIMING=notebooks $BIN/python -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=900 \
  -n "$JOBS" --dist loadfile -p tests.nbtiming book labs -q; notebooks_s=$(since "$t")
$BIN/python tools/timing.py record --start "$START" --step venv="$venv_s" --step calibrate="$calibrate_s" \
  --step unit="$unit_s" --step site="$site_s" --step notebooks="$notebooks_s"
$BIN/python - <<'PY'
import json
t = json.load(open("_build/timing/timing.json"))["make_test"]
u, n = t["unit_tests"], t["notebook_cells"]
print(f"make test took {t['total_s']:.0f} s")
print(f"{u['passed'] + n['passed']} passed, {u['failed'] + n['failed']} failed")
PY
