#!/usr/bin/env bash
# Convert a Qwen3-VL checkpoint to bard_vl, then answer a prompt with block-diffusion decoding.
#   bash examples/convert_and_generate.sh /ckpt/Qwen3-VL-4B-Instruct cat.png
# (Released Bard-VL-* checkpoints need no conversion: pass them to nemo_bard.generate directly.)
set -euo pipefail
SRC=${1:?usage: $0 QWEN3_VL_DIR IMAGE}
IMAGE=${2:?usage: $0 QWEN3_VL_DIR IMAGE}
DST=${DST:-checkpoints/$(basename "$SRC")-bard}
[ -f "$DST/config.json" ] || python -m nemo_bard.convert --src "$SRC" --dst "$DST" --block-size 4
# One token per forward (the accuracy setting) ...
python -m nemo_bard.generate --model "$DST" --image "$IMAGE" --prompt "Describe the image." \
    --block-size 4 --denoising-steps 4 --confidence-threshold 1.0 --remasking-strategy low_confidence_static \
    --max-new-tokens 256 --stream
# ... and the fast setting, with decoding statistics (TPF, forwards, wall time) written as JSON.
python -m nemo_bard.generate --model "$DST" --image "$IMAGE" --prompt "Describe the image." \
    --block-size 4 --confidence-threshold 0.9 --max-new-tokens 256 --stats-json stats.json
