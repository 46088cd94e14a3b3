#!/usr/bin/env bash
# Mutation testing with mutmut 3, one module at a time: a surviving mutant is an assertion the
# tests are missing. Each module runs in its own scratch copy of src/ and tests/ (so the working
# tree is never touched) against the fast test files that exercise it, listed below.
#
#   scripts/mutation.sh training/losses evaluation/metrics     # modules under src/mitotype, .py optional
#   TESTS="tests/test_data.py" scripts/mutation.sh data/splits   # other test files
#   JOBS=2 scripts/mutation.sh inference/engine                 # parallel mutant workers (default 1)
#   SURVIVORS_ONLY=1 scripts/mutation.sh data/splits             # re-check only the last run's survivors
#   SAMPLE=4 scripts/mutation.sh training/loop                   # every 4th mutant only: an estimate of the score
#                                                                # for modules whose tests train models (hours in full)
#
# Prints mutmut's summary and the surviving mutants per module; `mutmut show NAME` in the printed
# scratch directory shows a mutant's diff. Needs `pip install mutmut` (3.8: only_mutate and forkserver
# settings). Not run in CI.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv_bin=${VENV_BIN:-$root/.venv/bin}
scratch=${MUTATION_DIR:-$root/build/mutation}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1

declare -A TESTS_FOR=(
  [training/losses]="tests/test_training.py tests/test_heads.py tests/test_baselines.py"
  [evaluation/metrics]="tests/test_evaluation.py"
  [data/splits]="tests/test_splits.py tests/test_data.py"
  [training/loop]="tests/test_training.py tests/test_runs.py tests/test_heads.py tests/test_foundation.py"
  [workflows/runs]="tests/test_runs.py tests/test_training.py tests/test_domains.py tests/test_tune_compare.py tests/test_bad_input.py tests/test_cli.py tests/test_data.py"
  [models/ensemble]="tests/test_ensemble.py tests/test_inference.py"
  [models/registry]="tests/test_models.py tests/test_inference.py tests/test_heads.py tests/test_baselines.py tests/test_custom_models.py tests/test_explain.py"
  [transforms/augment]="tests/test_transforms.py tests/test_inference.py tests/test_augment_contract.py"
)

[ $# -gt 0 ] || { echo "usage: $0 MODULE [MODULE...]   (e.g. training/losses; known: ${!TESTS_FOR[*]})" >&2; exit 2; }

for arg in "$@"; do
  module=${arg#src/}; module=${module#mitotype/}; module=${module%.py}
  [ -f "$root/src/mitotype/$module.py" ] || { echo "no module src/mitotype/$module.py" >&2; exit 2; }
  tests=${TESTS:-${TESTS_FOR[$module]:-}}
  [ -n "$tests" ] || { echo "no test files known for $module: set TESTS=\"tests/test_x.py ...\"" >&2; exit 2; }
  work=$scratch/${module//\//.}
  names=()
  if [ -n "${SURVIVORS_ONLY:-}" ] && [ -f "$work/results.txt" ]; then  # re-check last run's survivors with today's tests
    mapfile -t names < <(grep -E ': (survived|timeout|no tests)$' "$work/results.txt" | sed 's/^ *//; s/: [a-z ]*$//')
    rm -rf "$work/tests" && cp -r "$root/tests" "$work/"
    cp "$work/results.txt" "$work/results-before.txt"
    [ ${#names[@]} -gt 0 ] || { echo "$module: no survivors to re-check"; continue; }
  else
    rm -rf "$work" && mkdir -p "$work"
    cp -r "$root/src" "$root/tests" "$root/pyproject.toml" "$work/"
  fi
  # narrow the [tool.mutmut] section of the copy's pyproject.toml to this module and its tests
  "$venv_bin/python" - "$work/pyproject.toml" "src/mitotype/$module.py" $tests <<'PY'
import json, re, sys
path, module, tests = sys.argv[1], sys.argv[2], sys.argv[3:]
text = open(path).read()
text = re.sub(r"(?m)^only_mutate = .*$", f"only_mutate = {json.dumps([module])}", text)
text = re.sub(r"(?m)^pytest_add_cli_args_test_selection = .*$", f"pytest_add_cli_args_test_selection = {json.dumps(tests)}", text)
open(path, "w").write(text)
PY
  if [ -n "${SAMPLE:-}" ] && [ ${#names[@]} -eq 0 ]; then  # generate the mutants (a filter matching none runs none), keep every SAMPLE-th
    (cd "$work" && "$venv_bin/mutmut" run --max-children "${JOBS:-1}" "no.such.mutant" > mutmut-generate.log 2>&1 || true)
    mapfile -t names < <(cd "$work" && "$venv_bin/mutmut" results --all true 2>/dev/null | sed 's/^ *//; s/: [a-z ]*$//' | awk "NR % $SAMPLE == 1")
    [ ${#names[@]} -gt 0 ] || { tail -20 "$work/mutmut-generate.log"; exit 1; }
    echo "== $module: sampling ${#names[@]} mutants (every ${SAMPLE}th)"
  fi
  echo "== $module: mutating src/mitotype/$module.py against $tests (in $work)"
  started=$SECONDS
  (cd "$work" && "$venv_bin/mutmut" run --max-children "${JOBS:-1}" "${names[@]}" > mutmut-run.log 2>&1) || { tail -30 "$work/mutmut-run.log"; exit 1; }
  (cd "$work" && "$venv_bin/mutmut" results --all true > results.txt 2>&1 || true)
  if [ ${#names[@]} -gt 0 ] && [ -z "${SAMPLE:-}" ]; then  # a re-check: the other mutants keep their verdicts from the run before
    "$venv_bin/python" - "$work" "${names[@]}" <<'PY'
import sys
work, rerun = sys.argv[1], set(sys.argv[2:])
read = lambda name: dict(line.strip().rsplit(": ", 1) for line in open(f"{work}/{name}") if ": " in line)  # noqa: E731
before, now = read("results-before.txt"), read("results.txt")
with open(f"{work}/results.txt", "w") as out:
    out.writelines(f"    {n}: {now.get(n, s) if n in rerun else s}\n" for n, s in before.items())
PY
  fi
  "$venv_bin/python" - "$work/results.txt" "$module" $((SECONDS - started)) <<'PY'
import collections, sys
path, module, seconds = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [line.strip().rsplit(": ", 1) for line in open(path) if ": " in line]
rows = [(name, status) for name, status in rows if status != "not checked"]  # a SAMPLE run checks a subset
counts = collections.Counter(status for _, status in rows)
total = sum(counts.values())
killed = counts.get("killed", 0) + counts.get("caught by type check", 0) + counts.get("timeout", 0)  # a hang is caught too
score = f"{killed / total:.1%}" if total else "n/a"
print(f"{module}: {total} mutants, {killed} killed, {counts.get('survived', 0)} survived, "
      f"{counts.get('timeout', 0)} timeout, {counts.get('no tests', 0)} no tests, score {score} ({seconds} s)")
for name, status in rows:
    if status not in ("killed", "caught by type check", "timeout"):
        print(f"  {status}: {name}")
PY
done
