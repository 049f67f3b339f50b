# session 18, call 4: 1/1 step 2 paired with reduce-overhead built first (the quiet grid's missing row)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
timeout 222 python -m benchmarks.offload_bench --out /tmp/r --layers 8 --paired --modes reduce-overhead,default --configs 1/1/2:pp --no-resident --hook-configs "" --uva "" --jobs 1 --quiet --runs 9 --min-run-s 0.5 --timeout 215 2>&1 | tee $OUT/r.log
find /tmp/r -name '*.trace.json.gz' -delete; (cd /tmp && tar czf $OUT/r.tgz r)
