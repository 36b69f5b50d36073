#!/bin/bash
# The Colab notebook's T4 path on a CUDA machine without network, end to end (issue 26):
# a tiny random-weight deepseek-shaped Llama (fp16 safetensors, SmolLM2's tokenizer from .whl/tok),
# configs/deepseek-7b-qlora-t4.yaml as shipped (profile t4-compiled: fp16, no bf16, no flash
# attention; 4-bit NF4 via bitsandbytes; device cuda), only the sizes made small; the notebook
# executed cell by cell in a kernel under a simulated Colab (scripts/colab_sim.py): install cell
# as written (source zip on the simulated Drive), live output, an interrupt at training step 2
# and the rerun that resumes, the report shown inline, the adapter zip "downloaded".
# Needs .whl/nbsite.tar.xz and .whl/tok (scripts/build_gpu_notebook_site.sh). Writes to $OUT.
set -u
OUT=${OUT:-/tmp/notebook-gpu-out}
mkdir -p "$OUT" /tmp/nbsite
python3 -c "import tarfile; tarfile.open('.whl/nbsite.tar.xz').extractall('/tmp/nbsite')" || exit 1
export PYTHONPATH=/tmp/nbsite PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, triton, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), '| transformers', transformers.__version__, '| peft', peft.__version__, '| triton', triton.__version__, '| bitsandbytes', bitsandbytes.__version__)" | tee -a "$OUT/gpu.txt"
python3 scripts/colab_sim.py make-model --tokenizer .whl/tok --out /tmp/tiny-deepseek || exit 1
# The T4 config's training and evaluation, sizes shrunk: 100 records asked (about a quarter fit 512 tokens of this tokenizer), 6 steps of 4 x 512 tokens, 4 prompts.
SETS="train.model=/tmp/tiny-deepseek;data.num_samples=100;train.max_steps=6;train.max_length=512;train.max_val_samples=4"
SETS="$SETS;train.eval_steps=3;eval.max_samples=4;eval.max_new_tokens=16;eval.batch_size=4"
# INTERRUPT_AT= (empty) skips the interrupt and rerun, should the whole check not fit one 600 s command.
INTERRUPT_AT=${INTERRUPT_AT-2}
python3 scripts/colab_sim.py run --workdir /tmp/colab-sim --out "$OUT" --source-zip --host-path /tmp/nbsite \
  --set "$SETS" ${INTERRUPT_AT:+--interrupt-at-step "$INTERRUPT_AT"} --cell-timeout 480
status=$?
# What the run folder holds, and the facts training recorded (device, dtype, profile, 4-bit, steps).
RUN=/tmp/colab-sim/drive/finqlora/runs/deepseek-7b-qlora-t4
ls -la "$RUN" "$RUN/report" > "$OUT/run_folder.txt" 2>&1
python3 - "$RUN" <<'PY' | tee "$OUT/training_facts.txt"
import json, sys
info = json.load(open(sys.argv[1] + "/training_info.json"))
hp = info["hyperparameters"]
print(json.dumps({"status": info["status"], "global_step": info["global_step"], "resumed_from": info["resumed_from"],
                  "device": info["device"], "libraries": info["libraries"], "timing": info["timing"],
                  "throughput": info["throughput"], "memory": info["memory"]}, default=str))
print(json.dumps({k: v for k, v in hp.items() if not isinstance(v, (dict, list))}, default=str))
PY
cp "$RUN/report/report.md" "$RUN/report/report.html" "$RUN/loss.png" "$OUT/" 2>/dev/null
cp -r "$RUN/runs" "$OUT/tensorboard" 2>/dev/null
exit $status
