#!/usr/bin/env bash
# The exact commands that produced the drafters shipped for SmolLM2-135M-Instruct
# (src/specdec/assets/smollm2/: draft_vocab.json, the DistillSpec draft in draft/, the EAGLE-3
# head in eagle/, the ranking auto.json), then the measurement quoted in docs/training.md.
# Training is time-budgeted (--max-minutes): on another machine the step count, and so the
# weights, will differ. The data stage resumes: rerunning it answers only prompts not yet answered.
# Usage: scripts/train_smollm2_drafters.sh [RUN_DIR]      (default runs/smollm2)
# Stages can be skipped by setting SKIP="data vocab draft eagle eagle3 plot measure" words.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/smollm2}
SPECDEC=${SPECDEC:-.venv/bin/specdec}
PYTHON=${PYTHON:-.venv/bin/python}
ASSETS=src/specdec/assets/smollm2
SKIP=${SKIP:-}
skip() { [[ " $SKIP " == *" $1 "* ]]; }

# Self-distillation data: chat prompts built offline (stdlib docstrings and code, Python's
# reference topics, /usr/share/doc, man pages, word problems), answered by the bfloat16 target,
# 16 conversations per pass, 30 % of them sampled at T = 0.7, top-p 0.95.
skip data || "$SPECDEC" train data --target smollm2 --out "$RUN/data" --num-prompts 1600 \
  --batch-size 16 --max-new-tokens 160 --dtype bfloat16 --threads 2

# The draft vocabulary: tokens of the target's replies first (shipped: make_drafter finds it).
skip vocab || "$SPECDEC" train draft-vocab --target smollm2 --data "$RUN/data" --out "$ASSETS"

# The DistillSpec draft: the target's layers 0 and 29 with its (frozen, borrowed) embeddings,
# distilled over the quarter of the vocabulary it drafts with.
skip draft || "$SPECDEC" train draft --target smollm2 --data "$RUN/data" --out "$ASSETS/draft" \
  --num-layers 2 --draft-vocab 12288 --batch-size 8 --seq-len 256 --eval-interval 50 --eval-batches 8 \
  --max-minutes 25 --threads 2

# An EAGLE-1 head first (training-time test over 3 drafting steps, the final state only), its
# layer started from the target's last one.
EAGLE=(--batch-size 8 --window 64 --ttt-steps 3 --kl-rows 128 --lr 1e-3 --eval-interval 100)
skip eagle || "$SPECDEC" train eagle --target smollm2 --data "$RUN/data" --out "$RUN/eagle1" \
  --feature-layers none --steps 1300 "${EAGLE[@]}" --max-minutes 25 --threads 2

# The shipped EAGLE-3 head: layers 2 and 15 fused with the final state, started from that head
# (the fusion starts as the identity on the final state), 40 more minutes on one thread. The
# control beside it, on the other core: the EAGLE-1 head trained as long without the fusion.
skip eagle3 || {
  "$SPECDEC" train eagle --target smollm2 --data "$RUN/data" --out "$ASSETS/eagle" --init "$RUN/eagle1" \
    --feature-layers auto --steps 2000 "${EAGLE[@]}" --max-minutes 40 --threads 1 &
  "$SPECDEC" train eagle --target smollm2 --data "$RUN/data" --out "$RUN/eagle1-cont" --init "$RUN/eagle1" \
    --feature-layers none --steps 2000 "${EAGLE[@]}" --max-minutes 40 --threads 1
  wait
}

skip plot || {
  "$PYTHON" scripts/plot_training.py "$ASSETS/draft/training.json" docs/figures/smollm2_draft_training.png
  "$PYTHON" scripts/plot_training.py "$ASSETS/eagle/training.json" docs/figures/smollm2_eagle_training.png \
    --against "$RUN/eagle1-cont/training.json"
}

# The ranking for auto: ngram, eagle, draft by this run.
# Greedy, one thread, every chat task, 2 prompts each: prompt lookup, the trained drafters and
# llama.cpp side by side (the draft as a Q8_0 GGUF file, which llama-speculative-simple runs too;
# llama.cpp from scripts/build_llama_cpp.sh).
skip measure || {
  "$PYTHON" scripts/draft_to_gguf.py "$ASSETS/draft" --like smollm2 --out "$RUN/draft.q8_0.gguf" --dtype q8_0
  "$SPECDEC" bench --target smollm2 --draft "$RUN/draft.q8_0.gguf" --num-prompts 2 --threads 1 \
    --methods plain,ngram,eagle,eagle@2,draft,llama.cpp,llama.cpp-lookup,llama.cpp-spec \
    --llama-cpp "${LLAMA_CPP:-$HOME/.cache/specdec/llama.cpp/build/bin}" --out "$RUN/bench-race"
  # The EAGLE heads' agreement on the bench's prompts, and their speed, against each other.
  "$PYTHON" scripts/eagle_agreement.py "$RUN/eagle1" "$RUN/eagle1-cont" "$ASSETS/eagle" --speed 2
}
