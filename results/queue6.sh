#!/usr/bin/env bash
# Sixth queue (session 2): after queue5.sh, resume every run of it that its 1800 s limit cut (no DONE marker)
# from its last.ckpt, two at a time, until all are done.
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
while pgrep -f "results/queue5.sh" > /dev/null; do sleep 30; done
FLOAT=runs/checkpoints/lenet5_float_50ep/last.ckpt
resume() {
  local name=$1 kind=$2 ste=$3
  while [ ! -f runs/checkpoints/$name/DONE ]; do
    if [ "$kind" = twolayer ]; then
      results/run_one.sh $name 1800 fit --config recipes/mnist/twolayer.yaml --data.root /work/shared/data \
        --activations.ste $ste
    else
      results/run_one.sh $name 1800 fit --config recipes/mnist/lenet5_${kind}.yaml --data.root /work/shared/data \
        --activations.ste $ste --model.init_from $FLOAT
    fi
  done
}
todo=()
for job in a4:relu a4:identity a2:clipped_relu a2:identity a2:relu a4:clipped_relu \
           twolayer:relu twolayer:log_tailed_relu twolayer:clipped_relu twolayer:identity; do
  kind=${job%%:*}; ste=${job##*:}
  if [ "$kind" = twolayer ]; then name=twolayer_${ste}_full; else name=lenet5_${kind}_${ste}_full; fi
  [ -f runs/checkpoints/$name/DONE ] || todo+=("$name:$kind:$ste")
done
for ((i = 0; i < ${#todo[@]}; i += 2)); do
  for item in "${todo[@]:i:2}"; do IFS=: read -r name kind ste <<< "$item"; resume $name $kind $ste & done
  wait
done
