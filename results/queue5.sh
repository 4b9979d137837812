#!/usr/bin/env bash
# Fifth queue (session 2): what queue4.sh started, in two lanes of one thread each (two small-model runs side by
# side use the 2 cores better than one run with 2 threads). Waits for the 50-epoch float model, then the six
# Table 1 cells from it (50 epochs each) and the two-linear-layer recipe for each STE (20 epochs).
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
while [ ! -f runs/checkpoints/lenet5_float_50ep/DONE ]; do
  pgrep -f "logger.init_args.name lenet5_float_50ep" > /dev/null || results/run_one.sh lenet5_float_50ep 1800 \
    fit --config recipes/mnist/lenet5_float.yaml --data.root /work/shared/data
  sleep 20
done
FLOAT=runs/checkpoints/lenet5_float_50ep/last.ckpt
lane() {
  for job in "$@"; do
    kind=${job%%:*}; ste=${job##*:}
    if [ "$kind" = twolayer ]; then
      results/run_one.sh twolayer_${ste}_full 1800 fit --config recipes/mnist/twolayer.yaml \
        --data.root /work/shared/data --activations.ste $ste
    else
      results/run_one.sh lenet5_${kind}_${ste}_full 1800 fit --config recipes/mnist/lenet5_${kind}.yaml \
        --data.root /work/shared/data --activations.ste $ste --model.init_from $FLOAT
    fi
  done
}
lane a4:relu a4:identity a2:clipped_relu twolayer:relu twolayer:log_tailed_relu &
lane a2:identity a2:relu a4:clipped_relu twolayer:clipped_relu twolayer:identity &
wait
