#!/bin/bash
# One stage, old code against new, alternating, on a `bench/scale.py --keep-workspaces` workspace (issue 19 item 3):
# each run is `bench/stage_memory.py WS --stage STAGE` from that checkout (its own pipeline/, PYTHONSAFEPATH), with
# what the stage writes restored first (data/view for poison; data/approved and data/gx_history for validate: a
# passing run appends to the ledger), and a hash of what it wrote printed after (poison: the view's files;
# validate: the report's judged parts, less the observed values' float text).
# Usage: bench/stage_ab.sh OLD_CHECKOUT NEW_CHECKOUT WORKSPACE poison|validate [PAIRS=3]
# (an old checkout: `git worktree add /tmp/old <rev>`). Produced bench/results/poison_quarantine_stream_1m.log and
# validate_hash_keys_1m.log (then as /tmp scripts, inlined there).
set -eu
OLD=$1; NEW=$2; WS=$(cd "$3" && pwd); STAGE=$4; PAIRS=${5:-3}
PY=${PY:-$NEW/.venv/bin/python}
case $STAGE in
  poison) KEEP="data/view" ;;
  validate) KEEP="data/approved data/gx_history" ;;
  *) echo "stage_ab.sh: poison or validate, not $STAGE" >&2; exit 2 ;;
esac
BAK=$(mktemp -d)
trap 'for d in $KEEP; do rm -rf "$WS/$d"; cp -r "$BAK/$(basename $d)" "$WS/$d"; done; rm -rf "$BAK"' EXIT
for d in $KEEP; do cp -r "$WS/$d" "$BAK/$(basename $d)"; done
cd "$WS"
for pair in $(seq "$PAIRS"); do
  for ver in old new; do
    D=$OLD; [ $ver = new ] && D=$NEW
    for d in $KEEP; do rm -rf "$d"; cp -r "$BAK/$(basename $d)" "$d"; done
    $PY "$D/bench/stage_memory.py" "$WS" --stage "$STAGE" 2>&1 | tail -1 | sed "s/^/$STAGE $ver /"
    if [ "$STAGE" = poison ]; then
      md5sum data/view/view.json data/view/records.csv | sed "s/^/  $ver $pair /"
    else
      $PY -c "
import json, hashlib; r = json.load(open('reports/validation.json'))
x = {k: r[k] for k in ('success', 'tests', 'statistics', 'blocked', 'skipped')}
x['results'] = [{k: v for k, v in e.items() if k != 'observed'} for e in r['results']]
print('  $ver $pair judged', hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:16], 'success', r['success'])"
    fi
  done
done
