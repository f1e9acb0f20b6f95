"""Upper bounds of the integer settings: values past them overflow or make no sense, so they fail validation."""

# torch.Generator.manual_seed takes any value that fits 64 bits unsigned.
MAX_SEED = 2**64 - 1
# Token counts and positions live in int32 tensors in the kernels (lengths, page sizes, token budgets).
MAX_TOKENS = 2**31 - 1
# Sequences in one forward pass (batch sizes, CUDA-graph batch sizes).
MAX_BATCH = 2**20
# Ranks of one run.
MAX_WORLD_SIZE = 2**16
# Any other count (benchmark runs, head sizes).
MAX_COUNT = 2**31 - 1
# Counts and sizes of a model config that must be positive integers where present, in model_kwargs as in
# the checkpoint's config.json (None: not used by the family); at most MAX_COUNT.
MODEL_COUNT_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "head_dim",
)


def is_model_count(value: object) -> bool:
    """An int in [1, MAX_COUNT], or a non-empty per-layer list of them (some families size each layer)."""
    items = value if isinstance(value, (list, tuple)) and value else [value]
    return all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_COUNT for v in items)


def bad_model_counts(values: dict, prefix: tuple = ()) -> list[tuple[tuple, str, object]]:
    """(path, reason, value) for every MODEL_COUNT_KEYS entry of `values` (and its `*_config` sub-dicts)
    that is set but not an integer in [1, MAX_COUNT] (or a per-layer list of them)."""
    out: list[tuple[tuple, str, object]] = []
    for key, v in values.items():
        if key in MODEL_COUNT_KEYS and v is not None:
            if not is_model_count(v):
                out.append((prefix + (key,), f"must be a positive integer (at most {MAX_COUNT})", v))
        elif isinstance(key, str) and key.endswith("_config") and isinstance(v, dict):
            out += bad_model_counts(v, prefix + (key,))
    return out
