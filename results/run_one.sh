#!/usr/bin/env bash
# Usage: results/run_one.sh NAME TIMEOUT_S lightning-ste-args...
# Runs one recipe from the repo root, logging to results/NAME.log; resumes from the run's last.ckpt when a
# previous piece was cut (ckpt dir runs/checkpoints/NAME is passed as --checkpoint.dirpath).
set -u
name=$1; limit=$2; shift 2
cd "$(dirname "$0")/.."
ckdir=runs/checkpoints/$name
resume=()
if [ -f "$ckdir/last.ckpt" ] && [ ! -f "$ckdir/DONE" ]; then resume=(--ckpt_path "$ckdir/last.ckpt"); fi
echo "=== $(date -u +%FT%TZ) start: lightning-ste $* --checkpoint.dirpath $ckdir --trainer.logger.name $name ${resume[*]}" >> results/$name.log
timeout "$limit" lightning-ste "$@" --checkpoint.dirpath "$ckdir" --trainer.logger.init_args.name "$name" \
  --trainer.enable_progress_bar false "${resume[@]}" >> results/$name.log 2>&1
rc=$?
echo "=== $(date -u +%FT%TZ) exit $rc" >> results/$name.log
[ $rc -eq 0 ] && touch "$ckdir/DONE"
exit $rc
