"""Model resolution and loading: local folders and hub ids pass through, GGUF files are converted once,
dropout is off, the reference is frozen; the embedded GGUF model itself is tested under `-m slow`."""

import pytest
import torch

from conftest import build_model
from hypo.models import (
    DEFAULT_MODEL,
    Reference,
    add_lora,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)


def test_local_folders_and_hub_ids_pass_through(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found: .*nope.gguf"):
        resolve_model_path(str(tmp_path / "nope.gguf"))


def test_loaded_model_has_no_dropout_and_tokenizer_pads_left(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    assert model.config.attention_dropout == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_disable_dropout_zeroes_every_dropout_module():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.3), torch.nn.Dropout(0.1))
    disable_dropout(model)
    assert [m.p for m in model if isinstance(m, torch.nn.Dropout)] == [0.0, 0.0]


def test_reference_copy_is_frozen(tiny_tokenizer):
    reference = Reference(build_model(tiny_tokenizer).train())
    with reference.active() as model:
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="exactly one"):
        Reference()


def test_lora_reference_is_the_base_model_with_adapters_off(tiny_tokenizer):
    base = build_model(tiny_tokenizer, seed=0)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.clone()
    policy = add_lora(base, r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj")
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # make the adapters matter
    reference = Reference(peft_policy=policy)
    with torch.no_grad():
        policy_logits = policy(input_ids=ids).logits
        with reference.active() as ref:
            ref_logits = ref(input_ids=ids).logits
    assert not torch.allclose(policy_logits, base_logits, atol=1e-4)
    assert torch.allclose(ref_logits, base_logits, atol=1e-6)


@pytest.mark.slow
def test_embedded_default_converts_once_and_matches_the_gguf(tmp_path, monkeypatch):
    """The embedded SmolLM2-135M-Instruct: GGUF -> safetensors folder in $HYPO_CACHE, identical logits."""
    from transformers import AutoModelForCausalLM, GgufConfig

    from hypo.models import embedded_gguf_path

    monkeypatch.setenv("HYPO_CACHE", str(tmp_path))
    path = resolve_model_path(DEFAULT_MODEL)
    assert path.startswith(str(tmp_path)) and resolve_model_path(None) == path  # cached, same folder
    model, tokenizer = load_causal_lm(path), load_tokenizer(path)
    gguf = embedded_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  quantization_config=GgufConfig(dequantize=True))
    ids = tokenizer("Write a short review of a cafe.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, direct(input_ids=ids).logits, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
