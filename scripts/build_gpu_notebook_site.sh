#!/bin/bash
# Build what the GPU check of the Colab notebook (scripts/gpu_notebook_check.sh) carries to a GPU
# machine that has no network (docs/training.md, "GPU check of the notebook's T4 path"):
#   .whl/nbsite.tar.xz  the Python packages that machine lacks (finqlora's dependencies, the `gpu`
#                       extra, and nbclient + ipykernel to execute the notebook), unpacked and trimmed;
#   .whl/tok/           SmolLM2's tokenizer files (from the built-in model's cache), for the tiny
#                       random-weight model the check trains.
# Run from the repository root on a machine that reaches PyPI, after the built-in SmolLM2 is
# prepared (`finqlora models prepare builtin:smollm2-135m-instruct`, or any command that loads it).
# The GPU machine's image already has torch, transformers, peft, accelerate, safetensors, triton,
# numpy, matplotlib, jinja2, rich, sacrebleu, httpx, tensorboard, pip and setuptools
# (/work/.library/device/KINDS.md, "Python packages already there"); those wheels are dropped.
# typer and setuptools travel anyway, since the image's versions are not known here: finqlora
# needs typer >= 0.16, and the notebook builds finqlora with the installed setuptools only when
# it is >= 77 (else pip would fetch one, and that machine has no network). It stays below 82:
# torch 2.11 requires setuptools<82, and pip refuses a newer one beside it.
set -eu
DL=$(mktemp -d); SITE=$(mktemp -d)
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
PIPDL="python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d $DL"
# These two name torch and triton among their requirements: fetched alone (the image has both).
$PIPDL --no-deps bitsandbytes==0.50.2 liger-kernel==0.8.5
# The rest with their requirements, at the versions CI runs (`pip list` of the test environment).
$PIPDL pydantic==2.14.4 fastapi==0.165.0 uvicorn==0.55.0 gguf==0.19.0 openai==3.63.0 \
  nbclient==0.11.0 nbformat==5.11.1 ipykernel==7.4.0 jupyter-client==8.10.0 ipython==9.19.1 typing-extensions==4.16.0 typer==0.29.2 setuptools==80.9.0
# Already in the GPU machine's image (a newer or older copy here would only shadow it).
( cd "$DL" && for pattern in numpy requests urllib3 idna certifi charset_normalizer tqdm pyyaml PyYAML packaging \
    anyio h11 click httpx httpcore attrs psutil pygments markupsafe MarkupSafe jinja2 rich markdown_it_py mdurl \
    python_dateutil six filelock debugpy shellingham; do rm -f ${pattern}-*.whl; done )
ls "$DL"
( cd "$SITE" && for w in "$DL"/*.whl; do unzip -q -o "$w"; done
  for f in bitsandbytes/libbitsandbytes_*.so; do case $f in *cuda130.so|*cpu.so) ;; *) rm "$f";; esac; done
  find . -name __pycache__ -type d -prune -exec rm -rf {} + )
mkdir -p .whl/tok
tar -C "$SITE" -cf - . | xz -6 -T2 > .whl/nbsite.tar.xz
TOK="${FINQLORA_HOME:-$HOME/.cache/finqlora}/models/smollm2-135m-instruct"
cp "$TOK"/tokenizer.json "$TOK"/tokenizer_config.json "$TOK"/chat_template.jinja .whl/tok/
rm -rf "$DL" "$SITE"
du -sh .whl/nbsite.tar.xz .whl/tok
