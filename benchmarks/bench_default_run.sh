#!/usr/bin/env bash
# The default job (`mlflow run . --env-manager local`) at an older commit and at this checkout,
# alternately, each run in a fresh copy of the tracked files (so each creates its own MLflow
# store), ROUNDS rounds; prints one line per run. Needs the project installed in the current
# environment and MNIST where lossgeo finds it (e.g. LOSSGEO_DATA_DIR).
#
# Run: bash benchmarks/bench_default_run.sh OLD_COMMIT [ROUNDS]   (e.g. ee3a427 3)
set -euo pipefail
old=${1:?usage: bench_default_run.sh OLD_COMMIT [ROUNDS]}
rounds=${2:-3}
repo=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$work/old-tree" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$repo" worktree add --detach -q "$work/old-tree" "$old"

fresh_copy() {  # the tracked files of $1, copied into a new folder $2
  mkdir -p "$2"
  (cd "$1" && git ls-files -z | xargs -0 cp --parents -t "$2")
}

for round in $(seq "$rounds"); do
  for which in old new; do
    src=$repo
    [ "$which" = old ] && src=$work/old-tree
    run=$work/run-$which-$round
    fresh_copy "$src" "$run"
    start=$(date +%s.%N)
    (cd "$run" && mlflow run . --env-manager local > "$work/$which-$round.log" 2>&1)
    end=$(date +%s.%N)
    awk -v w="$which" -v r="$round" -v s="$start" -v e="$end" \
      'BEGIN { printf "%s round %s: %.1f s\n", w, r, e - s }'
  done
done
