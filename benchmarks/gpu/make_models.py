"""Write random-weight model folders (config.json + a tokenizer) that stand in for hub models on machines without the hub.

    python benchmarks/gpu/make_models.py OUT_DIR --tokenizer-from DIR

Each folder is loaded with `skip_loading_weights=true` (random weights in the config's shapes).
"""

import argparse
import shutil
from pathlib import Path

from transformers import LlamaConfig, Phi3Config

FAMILIES = {
    # shapes of meta-llama/Meta-Llama-3.1-8B-Instruct
    "llama-3.1-8b": lambda: LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, dtype="bfloat16",
    ),
    # shapes of TinyLlama/TinyLlama-1.1B-Chat-v1.0, but with the carried tokenizer's vocabulary (49152 ids):
    # TinyLlama's own 32000 would put the tokenizer's ids out of range
    "tinyllama-1.1b": lambda: LlamaConfig(
        vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
        dtype="bfloat16",
    ),
    # shapes of microsoft/phi-4 (Phi-3 architecture)
    "phi-4": lambda: Phi3Config(
        vocab_size=100352, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=10, max_position_embeddings=16384, rope_theta=250000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, pad_token_id=100349, dtype="bfloat16",
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--tokenizer-from", type=Path, required=True, help="folder with tokenizer.json etc.")
    a = p.parse_args()
    for name, make in FAMILIES.items():
        d = a.out / name
        d.mkdir(parents=True, exist_ok=True)
        make().save_pretrained(d)
        for f in a.tokenizer_from.iterdir():
            if f.name.startswith("tokenizer") or f.name.endswith(".jinja") or f.name == "special_tokens_map.json":
                shutil.copy(f, d / f.name)
        print(d)


if __name__ == "__main__":
    main()
