#!/bin/bash
# TPU VM pod slice: the same command on every worker; jax.distributed.initialize() (--distributed)
# finds the other workers by itself. WORKDIR must be a path every worker sees: an NFS/Filestore
# mount, or a bucket mounted with gcsfuse at the same path on each worker (a hierarchical-namespace
# bucket, so checkpoint folder renames are atomic). A gs:// URL itself is refused.
#   bash experiments/launch/tpu_vm_pod.sh my-tpu-v4-32 us-central2-b /mnt/bucket/runs/isbi
set -euo pipefail
TPU=$1 ZONE=$2 WORKDIR=$3
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  cd segjax && make .venv/.runtime &&
  .venv/bin/python -m segjax.main --distributed --config=configs/isbi.py --workdir=$WORKDIR \
      --config.train.batch_size=128"
