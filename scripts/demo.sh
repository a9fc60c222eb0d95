#!/usr/bin/env bash
# No weights needed: set up .venv, write a tiny checkpoint with RANDOM weights and Meta's real
# tokenizer (from the llama-models wheel), then run chat completion on it end to end.
# Extra arguments go to scripts/example_chat_completion.py (e.g. --temperature 0).
# torch: the CPU build on a machine without an NVIDIA GPU, else the CUDA build (setup.sh says which,
# and how large, before downloading; `bash scripts/setup.sh --cpu demo` / `--cuda demo` to choose).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
. .venv/bin/activate
ckpt=checkpoints/tiny-random
[ -f "$ckpt/params.json" ] || python scripts/make_tiny_checkpoint.py "$ckpt" --std 0.1
python scripts/example_chat_completion.py "$ckpt" --max_gen_len 32 "$@"
cat <<MSG
NOTE: $ckpt has RANDOM weights: everything ran for real, but the replies are gibberish.
Next, in this or any new shell (from $(pwd)):
    source .venv/bin/activate
    llama3-chat $ckpt --max-gen-len 32          # interactive; /help lists the commands
    python scripts/example_chat_completion.py /path/to/Llama3.1-8B-Instruct   # real weights
MSG
