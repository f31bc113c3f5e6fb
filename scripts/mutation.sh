#!/usr/bin/env bash
# Mutation testing of the decoding core with mutmut 3 (docs/mutation.md). Long (hours on 2 cores), so not part of CI.
#
#   scripts/mutation.sh [--head [--work DIR]] [--keep] [--jobs N] [MODULE ...]
#                                                        mutate and test MODULEs (default: all seven), then write the
#                                                        summary docs/mutation/mutation.json
#   scripts/mutation.sh [--head] --summary [MODULE ...]  rewrite the summary from the results already there
#   scripts/mutation.sh [--head] --recheck [MODULE ...]  the survivors again, against the tests committed now
#   scripts/mutation.sh [--head] --mutmut ARG ...        mutmut itself with this project's module names, e.g.
#                                                        `--mutmut show dlm.text.x_f__mutmut_1`
#
# The configuration is [tool.mutmut] in pyproject.toml: the seven modules of model_repository/dlm/1/dlm and the fast
# unit tests that decode in process (no tritonserver). mutmut copies them into mutants/ (git-ignored) and, for each
# mutant, runs the tests that reached the mutated function during a first instrumented run, one worker at a time
# (--max-children 1, or --jobs N). Three things the few lines of Python below add to mutmut:
# - mutmut names a module after its path (model_repository.dlm.1.dlm.text) while the tests import it as dlm.text:
#   mutmut is given the imported name, and the mutated copy goes first on sys.path (ahead of the editable install);
# - a mutant's tests run in collection order, so a file's module fixtures (an ONNX export) are set up once;
# - a function that a module- or session-scoped fixture calls is charged by mutmut to the first test that used the
#   fixture only, so a survivor is run once more against every test of the files its tests are in ("recheck"); one
#   those tests kill counts as killed, and the summary says how many were.
set -euo pipefail

MODULES_ALL=(candidates text inputs planner refine kv_cache scheduler)
MUTMUT_VERSION=3.8.1

usage() {
  cat <<EOF
usage: scripts/mutation.sh [--head [--work DIR]] [--keep | --resume] [--jobs N] [MODULE ...]
       scripts/mutation.sh [--head [--work DIR]] --summary [MODULE ...]
       scripts/mutation.sh [--head [--work DIR]] --recheck [MODULE ...]
       scripts/mutation.sh [--head [--work DIR]] --mutmut ARG ...

Mutation testing (mutmut $MUTMUT_VERSION, one worker) of the decoding core's modules against their fast unit tests;
writes killed / survived / timeout / total per module to docs/mutation/mutation.json (other modules' entries kept).
MODULE is one of: ${MODULES_ALL[*]} (default: all, in that order).

  --head      test the committed HEAD (git archive into build/mutation/head, mutants/ under it) rather than the
              working tree, so that edits in progress neither enter nor disturb the run
  --work DIR  with --head: the folder of that copy (default build/mutation/head); two runs of different modules in
              two folders can go on side by side, each adding its modules to the summary
  --keep      reuse mutants/ from an earlier run (its stats and results; the named modules are retested)
              instead of starting from an empty mutants/
  --resume    go on with a run that was stopped: the named modules' mutants not tested yet, in the same copy
              (with --head, the commit it tested), the results already there kept
  --jobs N    test N mutants at a time (default 1, since the tests' torch and ONNX Runtime take several cores;
              more on a machine with cores to spare)
  --summary   only rewrite docs/mutation/mutation.json from the results under mutants/
  --recheck   run the survivors of an earlier run again against the tests committed now (copied into mutants/),
              then rewrite the summary: tests written against survivors after the run started count; a test file
              that fails without any mutant (it tests code changed since) is not used
  --mutmut    run mutmut itself with the arguments that follow (show NAME, results, run NAME ...); names are
              dlm.MODULE.FUNCTION__mutmut_N
  -h, --help  this help

Equivalent mutants (those that cannot change behaviour) are listed in docs/mutation/equivalent.txt with the reason;
the summary counts them apart. mutmut is installed into .venv when missing (pip install mutmut==$MUTMUT_VERSION).
EOF
}

keep=0
jobs=1
resume=0
head=0
work=""
mode=run
modules=()
mutmut_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --keep) keep=1 ;;
    --resume) keep=1; resume=1 ;;
    --head) head=1 ;;
    --work) shift; work="$1" ;;
    --jobs) shift; jobs="$1" ;;
    --summary) mode=summary ;;
    --recheck) mode=recheck ;;
    --mutmut) mode=mutmut; shift; mutmut_args=("$@"); break ;;
    -*) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    *)
      if [[ " ${MODULES_ALL[*]} " != *" $1 "* ]]; then
        echo "unknown module $1 (one of: ${MODULES_ALL[*]})" >&2; exit 2
      fi
      modules+=("$1") ;;
  esac
  shift
done
[ ${#modules[@]} -gt 0 ] || modules=("${MODULES_ALL[@]}")

source "$(dirname "$0")/env.sh"
cd "$ROOT"
if ! python -c "import mutmut, sys; sys.exit(mutmut.__version__ != '$MUTMUT_VERSION')" 2>/dev/null; then
  echo "installing mutmut==$MUTMUT_VERSION into $VENV" >&2
  python -m pip install --quiet "mutmut==$MUTMUT_VERSION"
fi
export MUTATION_REPORT="$ROOT/docs/mutation/mutation.json" MUTATION_EQUIVALENT="$ROOT/docs/mutation/equivalent.txt"
export MUTATION_PAGE="$ROOT/docs/mutation.md"
WORK="$ROOT"
if [ "$head" = 1 ]; then
  WORK="${work:-$ROOT/build/mutation/head}"
  case "$WORK" in /*) ;; *) WORK="$ROOT/$WORK" ;; esac
  if [ "$mode" = run ] && [ "$keep" = 0 ]; then
    rm -rf "$WORK" && mkdir -p "$WORK"
    git archive HEAD | tar -x -C "$WORK"
    git rev-parse --short HEAD > "$WORK/TESTED_COMMIT"  # what the summary records, whenever it is written
    echo "testing HEAD $(cat "$WORK/TESTED_COMMIT") in $WORK"
  fi
  MUTATION_HEAD="$(cat "$WORK/TESTED_COMMIT" 2>/dev/null || echo "unknown commit")"
  export MUTATION_HEAD
fi
cd "$WORK"

# Test files that only the listed modules' mutants run: test_runtimes.py (its ONNX exports cost half a minute per
# mutant) checks the runtimes against each other, which run the same decoding code: it can tell a KV-cache or
# scheduler mutant apart, not one of the decoding loop's.
export MUTATION_ONLY_FOR="tests/test_runtimes.py:kv_cache,scheduler"

# mutmut with the tests' module names and the mutated copy first on sys.path; a mutant's tests in collection order
run_mutmut() {
  mkdir -p mutants/model_repository/dlm/1
  python - "$@" <<'PY'
import os
import sys

import mutmut.__main__ as mutmut_main
import mutmut.mutation.file_mutation as file_mutation
import mutmut.runners.harness as harness
import mutmut.utils.format_utils as format_utils
from mutmut.state import state

PARENT = "model_repository.dlm.1."
path_name = format_utils.get_mutant_name


def get_mutant_name(relative_source_path, mutant_method_name):
    name = path_name(relative_source_path, mutant_method_name)
    return name[len(PARENT):] if name.startswith(PARENT) else name


for module in (format_utils, file_mutation, mutmut_main):
    module.get_mutant_name = get_mutant_name

# mutmut hands pytest a mutant's tests in set order; interleaved files set their module fixtures up again at every
# switch. File by file, each file's tests in collection order (the instrumented run's), each is set up once; the
# files whose tests (of this mutant's) take least time go first, so that a mutant dies early (pytest runs with -x).
regular_run = harness.PytestRunner._pytest_args_regular_run


def fastest_files_first(self, tests):
    durations = state().duration_by_test
    order = {name: i for i, name in enumerate(durations)}
    file_time: dict[str, float] = {}
    for name in tests:
        file = name.split("::")[0]
        file_time[file] = file_time.get(file, 0.0) + durations.get(name, 0.0)

    def key(name):
        file = name.split("::")[0]
        return (file_time[file], file, order.get(name, len(order)), name)

    return regular_run(self, sorted(tests, key=key))


harness.PytestRunner._pytest_args_regular_run = fastest_files_first

# test files that only some modules' mutants run (MUTATION_ONLY_FOR, see below): each mutant runs the tests that
# reached its function, minus those
only_for = {f: set(ms.split(",")) for f, _, ms in (e.partition(":") for e in os.environ["MUTATION_ONLY_FOR"].split())}
collect_or_load_stats = mutmut_main.collect_or_load_stats


def collect_then_restrict(*args, **kwargs):
    collect_or_load_stats(*args, **kwargs)
    tests_by_function = state().tests_by_mangled_function_name
    for function, tests in tests_by_function.items():
        module = function.rsplit(".", 1)[0].removeprefix("dlm.")
        tests_by_function[function] = {t for t in tests if module in only_for.get(t.split("::")[0], {module})}


mutmut_main.collect_or_load_stats = collect_then_restrict
sys.path.insert(0, os.path.abspath("mutants/model_repository/dlm/1"))
sys.argv[0] = "mutmut"
sys.exit(mutmut_main.cli())
PY
}

# each survivor against every test of the files its tests are in; the exit codes into mutants/<module>.py.recheck
recheck() {
  python - "$@" <<'PY'
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

config = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["mutmut"]
stats = json.loads(Path("mutants/mutmut-stats.json").read_text())
tests_by_function = stats["tests_by_mangled_function_name"]
env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath("mutants/model_repository/dlm/1"),
                                                    os.path.abspath("mutants")]))
only_for = {f: set(ms.split(",")) for f, _, ms in (e.partition(":") for e in os.environ["MUTATION_ONLY_FOR"].split())}
clean_results: dict[str, bool] = {}


def clean(test_file: str) -> bool:
    """Whether the file's tests pass without a mutant; one that fails (it tests code changed since the run's
    commit) could not tell a mutant apart, so it is left out."""
    if test_file not in clean_results:
        done = subprocess.run([sys.executable, "-m", "pytest", "--rootdir=.", "-x", "-q", "-p", "no:randomly",
                               test_file, *config.get("pytest_add_cli_args", [])], cwd="mutants",
                              env=dict(env, MUTANT_UNDER_TEST=""), capture_output=True)
        clean_results[test_file] = done.returncode == 0
        if done.returncode != 0:
            print(f"recheck: {test_file} fails without a mutant, left out", flush=True)
    return clean_results[test_file]


for module in sys.argv[1:]:
    meta = Path(f"mutants/model_repository/dlm/1/dlm/{module}.py.meta")
    if not meta.exists():
        continue
    # a survivor listed as equivalent cannot be told apart by any test: not run again
    equivalent = {line.split()[0] for line in Path(os.environ["MUTATION_EQUIVALENT"]).read_text().splitlines()
                  if line.strip() and not line.startswith("#")}
    survivors = [n for n, code in json.loads(meta.read_text())["exit_code_by_key"].items()
                 if code == 0 and n not in equivalent]
    result = {}
    pointed = f"tests/test_{module}_mutants.py"  # the tests written against this module's survivors
    for name in survivors:
        # the pointed tests first: with -x, a mutant they kill dies at once
        files = ([pointed] if Path("mutants", pointed).exists() else []) + sorted(
            {f for t in tests_by_function.get(name.partition("__mutmut_")[0], [])
             if module in only_for.get(f := t.split("::")[0], {module})} - {pointed})
        files = [f for f in files if clean(f)]
        if not files:  # no test that passes without the mutant: it stays a survivor
            result[name] = 0
            continue
        start = time.time()
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "--rootdir=.", "-x", "-q", "-p", "no:randomly",
                                   *files, *config.get("pytest_add_cli_args", [])], cwd="mutants",
                                  env=dict(env, MUTANT_UNDER_TEST=name), capture_output=True, timeout=1800)
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = 36
        result[name] = code
        print(f"recheck {name}: {'killed' if code == 1 else 'survived' if code == 0 else f'exit {code}'} "
              f"({time.time() - start:.0f} s, {' '.join(files)})", flush=True)
    meta.with_suffix(".py.recheck").write_text(json.dumps(result, indent=1) + "\n")
PY
}

summary() {
  python - "$@" <<'PY'
import datetime
import hashlib
import json
import os
import sys
from pathlib import Path

import mutmut
from mutmut.stats import status_by_exit_code

seconds = os.environ.get("MUTATION_SECONDS")
out = Path(os.environ["MUTATION_REPORT"])
report = json.loads(out.read_text()) if out.exists() else {}
report = {"tool": f"mutmut {mutmut.__version__}", "command": "scripts/mutation.sh [--head] [MODULE ...]",
          "tests": "[tool.mutmut] pytest_add_cli_args_test_selection in pyproject.toml",
          "score": "(killed + timeout) / checked (total less the mutants a stopped run had not reached); "
                   "survivors killed by the recheck count as killed",
          "modules": report.get("modules", {})}
equivalent = {}
for line in Path(os.environ["MUTATION_EQUIVALENT"]).read_text().splitlines():
    name, _, reason = line.partition(" ")
    if name and not name.startswith("#"):
        equivalent[name] = reason.strip()
for module in sys.argv[1:]:
    source = Path(f"model_repository/dlm/1/dlm/{module}.py")
    meta = Path("mutants") / (str(source) + ".meta")
    if not meta.exists():
        print(f"{module}: no results under mutants/ (not run)", file=sys.stderr)
        continue
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    recheck_path = meta.with_suffix(".py.recheck")
    rechecked = json.loads(recheck_path.read_text()) if recheck_path.exists() else {}
    # a test failed (1) or ran past its time (36); another exit (a collection error) tells nothing
    killed_by_recheck = sorted(n for n, code in rechecked.items() if codes.get(n) == 0 and code in (1, 36))
    by_status: dict[str, list[str]] = {}
    for name, code in codes.items():
        status = "killed" if name in killed_by_recheck else status_by_exit_code[code]
        by_status.setdefault(status, []).append(name)
    count = {status: len(names) for status, names in by_status.items()}
    survived = sorted(by_status.get("survived", []))
    survived_equivalent = [n for n in survived if n in equivalent]
    total = len(codes)
    not_checked = count.get("not checked", 0)  # a run stopped before it reached them
    checked = total - not_checked
    detected = count.get("killed", 0) + count.get("timeout", 0)
    entry = {
        "killed": count.get("killed", 0),
        "killed_by_recheck": len(killed_by_recheck),
        "timeout": count.get("timeout", 0),
        "survived": len(survived),
        "survived_equivalent": len(survived_equivalent),
        "total": total,
        "not_checked": not_checked,
        "other": {s: c for s, c in count.items() if s not in {"killed", "survived", "timeout", "not checked"}},
        "score": round(detected / checked, 4) if checked else None,
        "score_without_equivalent": round(detected / (checked - len(survived_equivalent)), 4)
        if checked > len(survived_equivalent) else None,
        "survivors_not_equivalent": [n for n in survived if n not in equivalent],
        "survivors_equivalent": survived_equivalent,
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "tested": os.environ.get("MUTATION_HEAD", "working tree"),
        "survivors_rechecked_with": Path("RECHECKED_WITH").read_text().strip() if Path("RECHECKED_WITH").exists()
        else os.environ.get("MUTATION_HEAD", "working tree"),
        "run_seconds": int(seconds) if seconds else report["modules"].get(module, {}).get("run_seconds"),
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    report["modules"][module] = entry
    print(f"{module}: killed {entry['killed']} (recheck {entry['killed_by_recheck']}) timeout {entry['timeout']} "
          f"survived {entry['survived']} ({entry['survived_equivalent']} equivalent) total {total} "
          f"score {entry['score']}")
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(report, indent=2) + "\n")
# the results table of docs/mutation.md, between its markers, from the whole report
page = Path(os.environ["MUTATION_PAGE"])
start, end = "<!-- mutation-table: generated from docs/mutation/mutation.json -->", "<!-- end mutation-table -->"
rows = ["| module | killed | timeout | survived (equivalent) | checked / total | score | without equivalent | commit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |"]
for module, e in sorted(report["modules"].items()):
    checked = e["total"] - e.get("not_checked", 0)
    rows.append(f"| `{module}.py` | {e['killed']} | {e['timeout']} | {e['survived']} ({e['survived_equivalent']}) | "
                f"{checked} / {e['total']} | {e['score']:.1%} | {e['score_without_equivalent']:.1%} | {e['tested']} |")
text = page.read_text()
before, _, rest = text.partition(start)
_, _, after = rest.partition(end)
page.write_text(before + start + "\n" + "\n".join(rows) + "\n" + end + after)
PY
}

case "$mode" in
  mutmut) run_mutmut "${mutmut_args[@]}" ;;
  summary) summary "${modules[@]}" ;;
  recheck)
    # the tests committed now, in place of the run's copy of them
    rm -rf mutants/tests && git -C "$ROOT" archive HEAD tests | tar -x -C mutants
    git -C "$ROOT" rev-parse --short HEAD > RECHECKED_WITH
    echo "recheck of the survivors against the tests of $(cat RECHECKED_WITH), started $(date -u +%FT%TZ)"
    recheck "${modules[@]}"
    summary "${modules[@]}"
    ;;
  run)
    [ "$keep" = 1 ] || rm -rf mutants
    patterns=()
    for m in "${modules[@]}"; do patterns+=("dlm.$m.*"); done
    if [ "$resume" = 1 ]; then  # by name, the mutants without a result (mutmut retests every one a pattern names)
      mapfile -t patterns < <(python - "${modules[@]}" <<'PY'
import json
import sys
from pathlib import Path

for module in sys.argv[1:]:
    meta = Path(f"mutants/model_repository/dlm/1/dlm/{module}.py.meta")
    codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
    if not codes:
        print(f"dlm.{module}.*")  # never generated: all of it
    print("\n".join(name for name, code in codes.items() if code is None))
PY
)
      mapfile -t patterns < <(printf '%s\n' "${patterns[@]}" | sed '/^$/d')
      echo "resuming: ${#patterns[@]} mutants not tested yet"
      [ ${#patterns[@]} -gt 0 ] || { echo "nothing left to test"; exit 0; }
    fi
    start=$(date +%s)
    echo "mutation testing ${modules[*]} (mutmut $MUTMUT_VERSION, $jobs worker(s)), started $(date -u +%FT%TZ)"
    run_mutmut run --max-children "$jobs" "${patterns[@]}"
    echo "recheck of the survivors, started $(date -u +%FT%TZ)"
    recheck "${modules[@]}"
    MUTATION_SECONDS=$(( $(date +%s) - start )) summary "${modules[@]}"
    echo "finished $(date -u +%FT%TZ) after $(( $(date +%s) - start )) s"
    ;;
esac; exit  # on the line bash has read before it runs the case: a run survives edits to this file
