"""A random Llama of chosen widths as a GGUF file, quantized by llama.cpp: a stand-in for the
models people download, for timing kernels where no such file can be fetched (weights are random:
the speed of a pass does not depend on them). Widths that are multiples of 256 give the K-quant
mix of a real Q4_K_M file (Q4_K, with Q6_K for the embedding, half of ffn_down and attn_v).

    python scripts/random_gguf.py --out /tmp/synth --quant Q4_K_M      # ~460M parameters
    python scripts/quant_race.py --model /tmp/synth/model.Q4_K_M.gguf --dtypes quantized
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the model and its GGUF files")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--quant", default="Q4_K_M", help="llama-quantize's type name")
    parser.add_argument("--llama-cpp", type=Path, default=Path.home() / ".cache/specdec/llama.cpp/build/bin")
    args = parser.parse_args()

    import torch
    import transformers

    from specdec.models import sources
    from specdec.models.gguf_export import export_gguf

    torch.manual_seed(0)
    like = sources.smollm2_path()  # its tokenizer (and vocabulary size) go into the file
    config = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    folder = args.out / "hf"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    f16 = export_gguf(folder, args.out / "model.f16.gguf", like=like, dtype="f16")
    quantized = args.out / f"model.{args.quant}.gguf"
    subprocess.run([str(args.llama_cpp / "llama-quantize"), str(f16), str(quantized), args.quant], check=True)
    print(f"wrote {quantized} ({quantized.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
