# session 18, call 2: is it when cudagraph trees' manager is created, or the memory mapping?
# Four one-cell paired runs (default built first, then reduce-overhead), run at once, measured
# one at a time under one shared GPU lock.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1; T0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
touch /tmp/shared.lock
ARGS=(--layers 8 --paired --modes default,reduce-overhead --configs 2/1/1:pp --no-resident --hook-configs "" --uva "" --jobs 1 --quiet --runs 9 --min-run-s 0.5 --timeout 420)
for v in control trees-first trees-before-ro expandable; do
  mkdir -p /tmp/e/$v && ln -sf /tmp/shared.lock /tmp/e/$v/.gpu.lock
  case $v in
    control) ENV="" ;;
    expandable) ENV="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" ;;
    *) ENV="OFFLOAD_EXP=$v PYTHONPATH=$PWD/.whl/exp:$PYTHONPATH" ;;
  esac
  env $ENV timeout 470 python -m benchmarks.offload_bench --out /tmp/e/$v "${ARGS[@]}" > $OUT/$v.log 2>&1 &
  sleep 2
done
wait
echo "all done at $(( $(date +%s) - T0 )) s" | tee -a $OUT/device.txt
for v in control trees-first trees-before-ro expandable; do echo "== $v"; grep -A4 "^| method | modes" $OUT/$v.log | tail -2; grep -h "exp\]" /tmp/e/$v/logs/*.log; done | tee $OUT/summary.txt
find /tmp/e -name '*.trace.json.gz' -delete; (cd /tmp && tar czf $OUT/e.tgz e)
