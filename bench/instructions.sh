#!/bin/bash
# Instructions per request, counted by callgrind: deterministic where wall-clock CPU on a shared
# host is not (use it to compare two versions). One worker under valgrind, 400 requests of
# warm-up, then 2,000 requests on 8 keep-alive connections, counted over the whole process (event
# loop and log drainer). Needs valgrind and the nginx mocks of bench/run_bench.py on 18080/18081
# (any run of run_bench.py leaves them up).
#
# usage: bench/instructions.sh SRC_DIR TAG json|stream     e.g. bench/instructions.sh src head stream
#        (SRC_DIR: the src/ of a checkout or worktree; PYTHON: an interpreter with setpoint's deps)
set -euo pipefail
SRC=$(cd "$1" && pwd); TAG=$2; MODE=$3; PORT=${PORT:-18300}
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
D=${TMPDIR:-/tmp}/setpoint-instructions/$TAG; rm -rf "$D"; mkdir -p "$D"
cat > $D/cfg.yaml <<CFG
data_dir: $D/data
server: {host: 127.0.0.1, port: $PORT, workers: 1}
providers:
  mock: {type: openai_compatible, base_url: "http://127.0.0.1:18080/v1", api_key: sk-mock}
  mockstream: {type: openai_compatible, base_url: "http://127.0.0.1:18081/v1", api_key: sk-mock}
models:
  gpt-4o-mini: {deployments: [{provider: mock, model: gpt-4o-mini, pricing: {input_per_mtok: 0.15, output_per_mtok: 0.6}}]}
  gpt-4o-mini-stream: {deployments: [{provider: mockstream, model: gpt-4o-mini, pricing: {input_per_mtok: 0.15, output_per_mtok: 0.6}}]}
keys:
  - {name: bench, key: sk-bench-0123456789abcdef, team: bench}
CFG
cd "$D"
PYTHONPATH=$SRC valgrind --tool=callgrind --separate-threads=no --callgrind-out-file=$D/cg.out $PY -c "from setpoint.cli.main import main; main()" serve --config $D/cfg.yaml > $D/serve.log 2>&1 &
VP=$!
for i in $(seq 1 240); do curl -sf http://127.0.0.1:$PORT/health >/dev/null 2>&1 && break; sleep 0.5; done
$PY $HERE/harness/fixed_load.py $PORT 400 8 $MODE >/dev/null
sleep 1
callgrind_control -z $VP >/dev/null
$PY $HERE/harness/fixed_load.py $PORT 2000 8 $MODE >/dev/null
sleep 1.5
callgrind_control -d $VP >/dev/null
sleep 1
kill -INT $VP; wait $VP 2>/dev/null || true
F=$(ls -t $D/cg.out.* 2>/dev/null | head -1)
python3 - "$F" <<PY
import sys, re
tot = 0
for line in open(sys.argv[1]):
    if line.startswith("summary:") or line.startswith("totals:"):
        tot = int(line.split()[1]); break
print(f"$TAG $MODE instructions/request: {tot/2000:,.0f}")
PY
