#!/usr/bin/env bash
# docs/results/network-scaling.* and exchange-model.* (issue 33 item 3), as root, from the repository
# root: exchange only on 2, 4 and 8 test hosts (1 rank per host) and 2 and 4 hosts x 2 ranks (flat
# against hierarchical), whole steps on 4 and 8 hosts (and 4 x 2), then the model. Each launch is one
# horovodrun; all of them append to one results file. 17 minutes on a quiet 2-core machine.
# STEPS=N and OUT=DIR override the timed steps and the output folder.
set -uo pipefail   # a failed launch is recorded in the results; the others still run
out=${OUT:-docs/results}
steps=${STEPS:-8}
py=${PYTHON:-.venv/bin/python}
bench=(benchmarks/bench_network.py --links 1gbit --name network-scaling --out "$out" --warmup 2)
rm -f "$out/network-scaling.json"
"$py" "${bench[@]}" --exchange-only --hosts 2 4 8 --models lstm-lm resnet50 tensor-1m \
  --modes dense fp16 ranger-0.01 global-0.01 ranger-0.001 global-0.001 --steps "$steps"
"$py" "${bench[@]}" --append --hosts 4 8 --models mlp-102 lstm-lm \
  --modes dense ranger-0.01 global-0.01 --steps $((steps > 6 ? 6 : steps))
# 2 ranks per host: flat and hierarchical in launches of their own (hierarchical registers process
# sets, which take part in every cycle of Horovod's loop), merged into one cell each by --append
for modes in "ranger-0.01 global-0.01" "hier-0.01 hierglobal-0.01"; do
  "$py" "${bench[@]}" --append --exchange-only --ranks-per-host 2 --hosts 2 4 --models lstm-lm resnet50 \
    --modes $modes --steps $((steps > 6 ? 6 : steps))
done
for modes in "ranger-0.01 global-0.01" "hier-0.01 hierglobal-0.01"; do
  "$py" "${bench[@]}" --append --ranks-per-host 2 --hosts 4 --models mlp-102 \
    --modes $modes --steps $((steps > 6 ? 6 : steps))
done
"$py" benchmarks/exchange_model.py --results "$out/network-scaling.json" --out "$out"
