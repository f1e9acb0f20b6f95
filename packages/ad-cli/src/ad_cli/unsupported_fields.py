"""Known OpenAI and vLLM request fields not implemented yet, with the values ("off") openai_protocol accepts."""

# Fields of OpenAI's API and vLLM's extensions that the server does not implement yet, with the values that
# mean "off" (accepted). The same for every route that takes sampling fields.
SAMPLING_NOT_YET: dict[str, tuple] = {
    # Logprobs of the prompt need the logits of every prompt position; the runner computes the last one only.
    "prompt_logprobs": (None,),
    "min_p": (None, 0),
    "best_of": (None, 1),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1),
    "guided_grammar": (None,),
    "truncate_prompt_tokens": (None,),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
}
COMPLETION_NOT_YET: dict[str, tuple] = {
    **SAMPLING_NOT_YET, "suffix": (None, ""), "add_special_tokens": (None, True),
    # Chat's name for the count; completions give it as `logprobs: k`.
    "top_logprobs": (None, 0),
}
CHAT_NOT_YET: dict[str, tuple] = {
    **SAMPLING_NOT_YET,
    # Without tools there is nothing to call: "auto" and "none" both mean plain text, which is what runs.
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "verbosity": (None,),
    "moderation": (None,),
    "prompt_cache_key": (None,),
    "prompt_cache_retention": (None,),
    "prompt_cache_options": (None,),
    "echo": (None, False),
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
    "add_special_tokens": (None, False),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "documents": (None,),
}
# Keys of a chat message besides role and content, accepted when "off" (an assistant message sent back as the
# client received it carries tool_calls: null, refusal: null, ...).
MESSAGE_NOT_YET: dict[str, tuple] = {
    "name": (None,),
    "tool_calls": (None, []),
    "tool_call_id": (None,),
    "function_call": (None,),
    "refusal": (None,),
    "audio": (None,),
    "annotations": (None, []),
    "reasoning_content": (None,),
}
