"""Turn `prompt.queries` into the batch of prompts that build_and_run_ad sends."""

from typing import Any

# A prompt as the LLM API takes it: plain text or a chat (list of {role, content} messages).
Prompt = str | list[dict[str, Any]]


def normalize_queries(queries: Any, batch_size: int) -> list[Prompt]:
    """Queries as a list of prompts, repeated or cut to batch_size.

    Accepts a string, a list of strings, chat-message lists, or dicts with `prompt` or `messages`.
    The defaults live in ad_config's PromptConfig; a bad query is a ValueError naming its index.
    """
    if batch_size <= 0:
        raise ValueError(f"prompt.batch_size must be positive, got {batch_size}")
    if isinstance(queries, str):
        queries = [queries]
    if not isinstance(queries, list) or not queries:
        raise ValueError("prompt.queries: needs at least one query (a string, a chat or a dict)")
    out: list[Prompt] = []
    for i, q in enumerate(queries):
        if isinstance(q, dict):
            if "messages" in q:
                q = q["messages"]
            elif "prompt" in q:
                q = q["prompt"]
            else:
                raise ValueError(f"prompt.queries[{i}]: a dict query needs a 'prompt' or 'messages' key, "
                                 f"got {sorted(q)}")
        if not (isinstance(q, str) or (isinstance(q, list) and q and all(isinstance(m, dict) for m in q))):
            raise ValueError(f"prompt.queries[{i}]: expected a string or a list of chat messages, "
                             f"got {type(q).__name__}")
        out.append(q)
    return [out[i % len(out)] for i in range(batch_size)]


def as_chat(prompt: Prompt, has_template: bool) -> Prompt:
    """Plain strings go through the chat template when the tokenizer has one."""
    if isinstance(prompt, str) and has_template:
        return [{"role": "user", "content": prompt}]
    return prompt


def display(prompt: Prompt) -> str:
    """One line for a prompt: the text itself, or `role: content` turns joined by ` | `."""
    if isinstance(prompt, str):
        return prompt
    return " | ".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)
