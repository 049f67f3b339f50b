# session 18, call 3: does the slow model's copy stream (its pool index, its priority) decide?
# Three one-cell paired runs, one after another (nothing compiles beside a measurement).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD/.whl/exp:/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1; T0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
ARGS=(--layers 8 --paired --configs 2/1/1:pp --no-resident --hook-configs "" --uva "" --jobs 1 --quiet --runs 9 --min-run-s 0.5 --timeout 400)
run() {  # name streams modes limit
  OFFLOAD_STREAMS=$2 timeout $4 python -m benchmarks.offload_bench --out /tmp/s/$1 --modes $3 "${ARGS[@]}" > $OUT/$1.log 2>&1
  echo "$1 done at $(( $(date +%s) - T0 )) s" | tee -a $OUT/device.txt
}
run A-shift1 shift1 default,reduce-overhead 215
run B-high high default,reduce-overhead 200
run C-ro-first-shift2 shift2 reduce-overhead,default $(( 575 - $(date +%s) + T0 ))
for v in A-shift1 B-high C-ro-first-shift2; do echo "== $v"; grep " vs " $OUT/$v.log | grep "^| offload"; grep -h "exp\]" /tmp/s/$v/logs/*.log; done > $OUT/summary.txt
find /tmp/s -name '*.trace.json.gz' -delete; (cd /tmp && tar czf $OUT/s.tgz s)
cat $OUT/summary.txt
