# session 18, call 1 (docs/benchmarks.md, session 17 "Next"): does fresh memory for the weights remove the loss?
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1; T0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
set -o pipefail
timeout 330 python -m benchmarks.offload_bench --out /tmp/f --layers 8 --paired --modes default,reduce-overhead --configs 2/1/1:pp,2/1/2:pp --no-resident --hook-configs "" --uva "" --jobs 4 --quiet --runs 9 --min-run-s 0.5 --deadline 200 --timeout 320 --fresh-memory 2>&1 | tee $OUT/f.log
E=$(( $(date +%s) - T0 )); echo "fresh done at $E s" | tee -a $OUT/f.log
timeout $(( 560 - E )) python -m benchmarks.offload_bench --out /tmp/d --layers 8 --paired --modes default,default.2,reduce-overhead --configs 2/1/1:pp --no-resident --hook-configs "" --uva "" --jobs 1 --quiet --runs 9 --min-run-s 0.5 --timeout 230 2>&1 | tee $OUT/d.log
find /tmp/f /tmp/d -name '*.trace.json.gz' -delete; (cd /tmp && tar czf $OUT/fd.tgz f d)
echo "all done at $(( $(date +%s) - T0 )) s" | tee -a $OUT/d.log
