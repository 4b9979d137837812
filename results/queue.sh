#!/usr/bin/env bash
# The reproduction queue, one training process at a time (shared 2-core CPU). Shortened schedule (see RESULTS.md):
# MNIST runs: 3 epochs of 313 batches (limit_train_batches=313, a third of an MNIST epoch each), lr x0.1 at 1 and 2.
set -u
cd "$(dirname "$0")/.."
while [ -n "${WAIT_PID:-}" ] && kill -0 "$WAIT_PID" 2>/dev/null; do sleep 5; done
FLOAT=runs/checkpoints/lenet5_float/last.ckpt
SHORT=(--trainer.max_epochs 3 --trainer.limit_train_batches 313 --model.milestones "[1, 2]")
for bits in 2 4; do
  for ste in relu clipped_relu identity; do
    results/run_one.sh lenet5_a${bits}_${ste} 1200 fit --config recipes/mnist/lenet5_a${bits}.yaml \
      --data.root /work/shared/data --activations.ste $ste --model.init_from $FLOAT "${SHORT[@]}"
  done
done
results/run_one.sh orthogonal_subspaces_relu 900 fit --config recipes/synthetic/orthogonal_subspaces.yaml
results/run_one.sh orthogonal_subspaces_identity 900 fit --config recipes/synthetic/orthogonal_subspaces.yaml --activations.ste identity
results/run_one.sh teacher_student_clipped_relu 900 fit --config recipes/synthetic/teacher_student.yaml
for ste in relu clipped_relu log_tailed_relu identity; do
  results/run_one.sh twolayer_${ste} 900 fit --config recipes/mnist/twolayer.yaml --data.root /work/shared/data \
    --activations.ste $ste "${SHORT[@]}"
done
