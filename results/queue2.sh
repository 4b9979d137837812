#!/usr/bin/env bash
# Second queue: the other teacher-student STEs, then Table 1 A2 cells with a longer schedule:
# 3 full MNIST epochs, lr 0.1, x0.1 at epochs 1 and 2 (still *short* vs the paper's 50 epochs).
set -u
cd "$(dirname "$0")/.."
FLOAT=runs/checkpoints/lenet5_float/last.ckpt
for ste in relu identity; do
  results/run_one.sh teacher_student_${ste} 600 fit --config recipes/synthetic/teacher_student.yaml --activations.ste $ste
done
for ste in clipped_relu relu identity; do
  results/run_one.sh lenet5_a2_${ste}_3ep 1500 fit --config recipes/mnist/lenet5_a2.yaml \
    --data.root /work/shared/data --activations.ste $ste --model.init_from $FLOAT \
    --trainer.max_epochs 3 --model.milestones "[1, 2]"
done
