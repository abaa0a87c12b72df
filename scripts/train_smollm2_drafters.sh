#!/usr/bin/env bash
# The exact commands that produced the drafter shipped for SmolLM2-135M-Instruct
# (src/specdec/assets/smollm2/eagle), then the measurement quoted in docs/training.md.
# Training is time-budgeted (--max-minutes): on another machine the step count, and so the
# weights, will differ. Both stages resume: rerunning the data stage answers only new prompts.
# Usage: scripts/train_smollm2_drafters.sh [RUN_DIR]      (default runs/smollm2)
# Stages can be skipped by setting SKIP="data eagle vocab ship plot measure" words.
# The measure stage benches the head shipped by the ship stage (make_drafter finds it there);
# ship a head only if it beats ngram there (git checkout src/specdec/assets otherwise): the one
# trained here did not (docs/training.md), so the package ships none.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/smollm2}
SPECDEC=${SPECDEC:-.venv/bin/specdec}
PYTHON=${PYTHON:-.venv/bin/python}
SKIP=${SKIP:-}
skip() { [[ " $SKIP " == *" $1 "* ]]; }

# Self-distillation data: 96 chat prompts built offline (stdlib docstrings and code, Python's
# reference topics, /usr/share/doc, man pages, word problems), answered by the float32 target
# 16 conversations per pass, 30 % of them sampled at T = 0.7, top-p 0.95.
skip data || nice -n 10 "$SPECDEC" train data --target smollm2 --out "$RUN/data" --num-prompts 96 \
  --batch-size 16 --max-new-tokens 128 --threads 1

# The EAGLE head (training-time test over 3 drafting steps), its layer started from the
# target's last one.
skip eagle || nice -n 10 "$SPECDEC" train eagle --target smollm2 --data "$RUN/data" --out "$RUN/eagle" \
  --steps 400 --batch-size 8 --window 48 --ttt-steps 3 --kl-rows 48 --lr 2e-3 --eval-interval 25 \
  --max-minutes 12 --threads 1

# The draft vocabulary: tokens of the target's replies first, then the tokenizer's order.
skip vocab || nice -n 10 "$SPECDEC" train draft-vocab --target smollm2 --data "$RUN/data" --out "$RUN/draft-vocab"

skip ship || { mkdir -p src/specdec/assets/smollm2 && rm -rf src/specdec/assets/smollm2/eagle &&
  cp -r "$RUN/eagle" src/specdec/assets/smollm2/eagle &&
  cp "$RUN/draft-vocab/draft_vocab.json" src/specdec/assets/smollm2/; }

skip plot || "$PYTHON" scripts/plot_eagle_training.py "$RUN/eagle/training.json" docs/figures/smollm2_eagle_training.png

# Greedy, one thread, the chat tasks: plain, prompt lookup and the head side by side.
skip measure || nice -n 10 "$SPECDEC" bench --target smollm2 --methods plain,ngram,eagle \
  --tasks summarisation,rewrite,qa,coding --num-prompts 2 --max-new-tokens 64 --threads 1 \
  --out "$RUN/bench"
