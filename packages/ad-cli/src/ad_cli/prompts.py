"""Turn `prompt.queries` into the batch of prompts that build_and_run_ad sends."""

from typing import Any

DEFAULT_QUERIES = [
    "What is the capital of France?",
    "Name three primary colors.",
]


def normalize_queries(queries: Any, batch_size: int) -> list[Any]:
    """Queries as a list of prompts (strings or chat-message lists), repeated or cut to batch_size.

    Accepts a string, a list of strings, chat-message lists, or dicts with `prompt` or `messages`.
    """
    if queries is None or queries == [] or queries == "":
        queries = DEFAULT_QUERIES
    if isinstance(queries, str):
        queries = [queries]
    if isinstance(queries, list) and queries and all(isinstance(q, dict) and "role" in q for q in queries):
        queries = [queries]  # one chat conversation
    out: list[Any] = []
    for i, q in enumerate(queries):
        if isinstance(q, dict):
            if "messages" in q:
                q = q["messages"]
            elif "prompt" in q:
                q = q["prompt"]
            else:
                raise ValueError(f"prompt.queries[{i}]: a dict query needs a 'prompt' or 'messages' key, got {sorted(q)}")
        if not (isinstance(q, str) or (isinstance(q, list) and all(isinstance(m, dict) for m in q))):
            raise ValueError(f"prompt.queries[{i}]: expected a string or a list of chat messages, got {type(q).__name__}")
        out.append(q)
    if batch_size <= 0:
        raise ValueError(f"prompt.batch_size must be positive, got {batch_size}")
    return [out[i % len(out)] for i in range(batch_size)]


def as_chat(prompt: Any, has_template: bool) -> Any:
    """Plain strings go through the chat template when the tokenizer has one."""
    if isinstance(prompt, str) and has_template:
        return [{"role": "user", "content": prompt}]
    return prompt


def display(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return " | ".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)
