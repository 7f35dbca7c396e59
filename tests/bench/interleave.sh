#!/bin/bash
# Old and new release binaries, interleaved: per round, each binary runs
# `bench lake`, `bench import` and `bench ingest` (old first), so that both
# see the same machine (these VMs drift by 2× within a session). Logs go to
# OUTDIR (lake-<round>-<old|new>.log, …); OUTDIR/progress says where it is.
# Issue 7's "no slower" rule: the new median within the old runs' range.
#
#   tests/bench/interleave.sh OLD_BINARY NEW_BINARY ROUNDS OUTDIR
#
# BENCHES (default "lake import ingest") picks which of the three run, e.g.
# BENCHES=lake for a change that only the SQL engine's code can feel.
#
# Run nothing else meanwhile (no cargo build). Needs the venv with DuckDB
# that .ci/run makes (~/.cache/sluice/venv).
set -u
OLD=$1; NEW=$2; ROUNDS=$3; OUT=$4
BENCHES=${BENCHES:-lake import ingest}
mkdir -p "$OUT"
PY=${PYTHON:-$HOME/.cache/sluice/venv/bin/python}
for i in $(seq 1 "$ROUNDS"); do
  for who in old new; do
    BIN=$OLD; [ "$who" = new ] && BIN=$NEW
    for b in $BENCHES; do
      echo "== round $i $who $b $(date -u +%T)" >> "$OUT/progress"
      case $b in
        lake) "$BIN" bench lake --events 1000000 --runs 1 --python "$PY" > "$OUT/lake-$i-$who.log" 2>&1 ;;
        import) "$BIN" bench import --rows 1000000 > "$OUT/import-$i-$who.log" 2>&1 ;;
        ingest) "$BIN" bench ingest --duration 10s > "$OUT/ingest-$i-$who.log" 2>&1 ;;
        *) echo "unknown bench $b" >&2; exit 2 ;;
      esac
    done
  done
done
echo done >> "$OUT/progress"
