#!/usr/bin/env bash
# Third queue (the CPU went idle): Table 1 cells with the paper's full schedule (recipe as is: 50 epochs,
# lr 0.1, x0.1 at 20 and 40), from the 5-epoch float checkpoint.
set -u
cd "$(dirname "$0")/.."
FLOAT=runs/checkpoints/lenet5_float/last.ckpt
for cell in a2:clipped_relu a2:relu a4:clipped_relu a4:relu a2:identity a4:identity; do
  a=${cell%%:*}; ste=${cell##*:}
  results/run_one.sh lenet5_${a}_${ste}_50ep 1800 fit --config recipes/mnist/lenet5_${a}.yaml \
    --data.root /work/shared/data --activations.ste $ste --model.init_from $FLOAT
done
