#!/bin/bash
# Side-by-side cold `dvc repro` on digits: c901d6d (before issue 10) vs 3946835 (the refactor), interleaved.
# Usage: BASE_VENV=/path/to/c901d6d-venv bench/repro_before_after.sh   (run from the repo root; prints to $OUT)
REPO=$PWD
set -u
out=${OUT:-/tmp/repro_time.txt}; : > $out
for trial in 1 2; do
  for rev in c901d6d 3946835; do
    d=/tmp/rt_${rev}_$trial; rm -rf $d
    git clone -q "$REPO" $d && (cd $d && git checkout -q $rev)
    if [ $rev = c901d6d ]; then venv=${BASE_VENV:?set BASE_VENV to a venv installed from c901d6d}; else venv=${NEW_VENV:-$REPO/.venv}; fi
    cd $d
    s=$(date +%s.%N)
    PATH=$venv/bin:$PATH MLFLOW_TRACKING_URI=sqlite:///$d/mlflow.db GX_ANALYTICS_ENABLED=false PYTHONDONTWRITEBYTECODE=1 dvc repro > $d/repro.log 2>&1
    rc=$?
    e=$(date +%s.%N)
    echo "$rev trial $trial rc $rc wall $(echo "$e - $s" | bc) s load $(cut -d' ' -f1 /proc/loadavg)" >> $out
    cd /tmp
  done
done
