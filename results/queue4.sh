#!/usr/bin/env bash
# Fourth queue (session 2): the full recipes as they are. Float LeNet-5 for 50 epochs (lr 0.1, x0.1 at 20 and 40),
# then the six Table 1 cells from that float checkpoint (50 epochs each), then the two-linear-layer recipe for
# each STE (20 epochs, x0.1 at 10 and 15). Each piece resumes from runs/checkpoints/<name>/last.ckpt if cut.
set -u
cd "$(dirname "$0")/.."
results/run_one.sh lenet5_float_50ep 1800 fit --config recipes/mnist/lenet5_float.yaml --data.root /work/shared/data
FLOAT=runs/checkpoints/lenet5_float_50ep/last.ckpt
for cell in a4:relu a2:identity a4:identity a2:relu a2:clipped_relu a4:clipped_relu; do
  a=${cell%%:*}; ste=${cell##*:}
  results/run_one.sh lenet5_${a}_${ste}_full 1800 fit --config recipes/mnist/lenet5_${a}.yaml \
    --data.root /work/shared/data --activations.ste $ste --model.init_from $FLOAT
done
for ste in relu clipped_relu log_tailed_relu identity; do
  results/run_one.sh twolayer_${ste}_full 1800 fit --config recipes/mnist/twolayer.yaml \
    --data.root /work/shared/data --activations.ste $ste
done
