"""The tokens a completion ends with: the chat template's end-of-turn token and every stop id of a model.

Offline completions are tokenized ending with the token the policy would stop with (`hypo.data.encoding`),
and sampling stops at every one of the model's stop ids (`hypo.sampling`), so both read them here.
"""

from __future__ import annotations

import torch


def end_of_turn_token_id(tokenizer) -> int | None:
    """The token a chat model ends its turn with: the first special token its chat template writes after an
    assistant message's content (Llama 3 `<|eot_id|>`, Gemma `<end_of_turn>`, ChatML `<|im_end|>`); the
    tokenizer's EOS without a template, or when the template writes no special token there.

    Example: a ChatML template renders "...<|im_start|>assistant\nPONG<|im_end|>\n" -> id of <|im_end|>.
    """
    if getattr(tokenizer, "chat_template", None):
        marker = "PONG0123"
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "PING"},
                                                  {"role": "assistant", "content": marker}], tokenize=False)
        except Exception:  # a template that refuses this exchange: fall back to EOS
            text = ""
        if marker in text:
            special = set(tokenizer.all_special_ids) | {i for i, token in
                                                         getattr(tokenizer, "added_tokens_decoder", {}).items()
                                                         if getattr(token, "special", False)}
            after = tokenizer(text[text.index(marker) + len(marker):], add_special_tokens=False)["input_ids"]
            for token in after:
                if token in special:
                    return int(token)
    return tokenizer.eos_token_id


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the model's `generation_config.eos_token_id` (an int or a list; Llama 3
    lists `<|eot_id|>` there), the tokenizer's EOS and the chat template's end-of-turn token
    (`end_of_turn_token_id`, what conversational offline completions end with), without repeats, in that order.

    Example: generation_config.eos_token_id [128001, 128009], tokenizer EOS 128001 -> [128001, 128009].
    """
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    for value in (getattr(generation_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None),
                  end_of_turn_token_id(tokenizer)):
        if value is None:
            continue
        for token in torch.as_tensor(value).reshape(-1).tolist():
            if int(token) not in ids:
                ids.append(int(token))
    if not ids:
        raise ValueError("no stop token: neither the model's generation config nor the tokenizer has an eos_token_id")
    return ids
