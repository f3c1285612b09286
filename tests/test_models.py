"""Model resolution and loading: local folders and hub ids pass through, GGUF files are converted once
into a cache that survives concurrent processes, broken entries and interrupted conversions; dropout is
off, the reference is frozen. The conversion's heavy step (dequantizing a real GGUF) is replaced here by
the tiny model; the embedded GGUF model itself is tested under `-m slow`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hypo
from conftest import build_model
from hypo.config import DEFAULT_MODEL
from hypo.models import gguf as models
from hypo.models.gguf import MARKER_NAME, ModelCacheError, convert_gguf
from hypo.models.loading import add_lora, disable_dropout, load_causal_lm, load_tokenizer, resolve_model_path
from hypo.models.reference import Reference


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


# --------------------------------------------------------------------------- the converted-model cache


@pytest.fixture()
def fake_gguf(tmp_path, monkeypatch, tiny_tokenizer):
    """A stand-in GGUF file, a fresh $HYPO_CACHE, and a `_load_gguf` that returns the tiny model; the list
    records each conversion."""
    monkeypatch.setenv("HYPO_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    calls = []

    def load(path):
        calls.append(path)
        return build_model(tiny_tokenizer), tiny_tokenizer

    monkeypatch.setattr(models, "_load_gguf", load)
    return gguf, calls


def _leftovers(entry: Path) -> list[str]:
    return sorted(p.name for p in entry.parent.glob(f"{entry.name}.tmp*"))


def _assert_usable(path: str, tiny_tokenizer) -> None:
    assert models._folder_problem(Path(path)) is None
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = build_model(tiny_tokenizer)(input_ids=ids).logits
        assert torch.equal(load_causal_lm(path)(input_ids=ids).logits, expected)
    assert load_tokenizer(path).pad_token_id is not None


def test_gguf_is_converted_once_with_a_completeness_marker(fake_gguf, tiny_tokenizer):
    gguf, calls = fake_gguf
    path = resolve_model_path(str(gguf))
    entry = Path(path)
    assert entry.parent == models.cache_dir() / "models" and len(calls) == 1
    files = json.loads((entry / MARKER_NAME).read_text())["files"]
    assert {"config.json", "model.safetensors"} <= set(files)
    assert all((entry / name).stat().st_size == size for name, size in files.items())
    assert resolve_model_path(str(gguf)) == path and len(calls) == 1  # reused
    assert resolve_model_path(str(gguf.parent), gguf_file=gguf.name) == path and len(calls) == 1
    _assert_usable(path, tiny_tokenizer)
    assert _leftovers(entry) == []


def _drop_weights(entry: Path) -> None:
    (entry / "model.safetensors").unlink()


def _old_style_entry(entry: Path) -> None:  # what the unlocked race left behind: no weights, no marker
    for path in entry.iterdir():
        if path.name != "config.json":
            path.unlink()


def _truncate(entry: Path) -> None:
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _truncate_and_fix_the_marker(entry: Path) -> None:  # only the safetensors header can tell
    _truncate(entry)
    record = json.loads((entry / MARKER_NAME).read_text())
    record["files"]["model.safetensors"] = (entry / "model.safetensors").stat().st_size
    (entry / MARKER_NAME).write_text(json.dumps(record))


def _corrupt_header(entry: Path) -> None:
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\x00" * 8  # the header is no longer JSON; same size
    weights.write_bytes(bytes(data))


def _bad_offsets(entry: Path) -> None:  # a readable JSON header that describes no tensors properly
    weights = entry / "model.safetensors"
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": 7}}).encode().ljust(length)
    weights.write_bytes(data[:8] + header + data[8 + length:])


def _unreadable_marker(entry: Path) -> None:
    (entry / MARKER_NAME).write_text('{"files": {"config.json": 1')


def _entry_is_a_file(entry: Path) -> None:
    import shutil

    shutil.rmtree(entry)
    entry.write_text("not a folder")


@pytest.mark.parametrize(("damage", "problem"), [
    (_drop_weights, "model.safetensors is missing"),
    (_old_style_entry, f"no {MARKER_NAME}"),
    (_truncate, "model.safetensors has"),
    (_truncate_and_fix_the_marker, "model.safetensors is truncated"),
    (_corrupt_header, "model.safetensors is unreadable header"),
    (_bad_offsets, "model.safetensors is unreadable header"),
    (_unreadable_marker, f"unreadable {MARKER_NAME}"),
    (_entry_is_a_file, "not a folder"),
])
def test_broken_cache_entry_is_rebuilt_with_a_warning_naming_it(fake_gguf, tiny_tokenizer, caplog, damage, problem):
    gguf, calls = fake_gguf
    path = resolve_model_path(str(gguf))
    damage(Path(path))
    with caplog.at_level("WARNING", logger="hypo.models"):
        assert resolve_model_path(str(gguf)) == path
    assert len(calls) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == 30]
    assert len(warnings) == 1 and warnings[0].startswith(f"{path}: broken converted model") and problem in warnings[0]
    _assert_usable(path, tiny_tokenizer)


def test_leftover_temporary_folders_are_removed(fake_gguf, tiny_tokenizer):
    gguf, calls = fake_gguf
    entry = models._gguf_cache_folder(gguf)
    entry.parent.mkdir(parents=True)
    for name in (f"{entry.name}.tmp4242", f"{entry.name}.tmp-4243-0badcafe"):  # older and current naming
        (entry.parent / name).mkdir()
        (entry.parent / name / "config.json").write_text("{}")
    assert resolve_model_path(str(gguf)) == str(entry) and _leftovers(entry) == []
    (entry.parent / f"{entry.name}.tmp-4244-0badcafe").mkdir()  # next to a complete entry: removed too
    assert resolve_model_path(str(gguf)) == str(entry) and _leftovers(entry) == []
    assert len(calls) == 1
    _assert_usable(str(entry), tiny_tokenizer)


def test_failed_conversion_leaves_nothing_behind(fake_gguf, monkeypatch, tiny_tokenizer):
    gguf, calls = fake_gguf
    entry = models._gguf_cache_folder(gguf)

    def crash(path):
        raise RuntimeError("out of memory while dequantizing")

    monkeypatch.setattr(models, "_load_gguf", crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        resolve_model_path(str(gguf))
    assert not entry.exists() and _leftovers(entry) == []

    def config_only(model, tokenizer, folder):  # a writer that forgot the weights
        folder.mkdir()
        model.config.save_pretrained(folder)

    monkeypatch.setattr(models, "_load_gguf", lambda path: (build_model(tiny_tokenizer), tiny_tokenizer))
    monkeypatch.setattr(models, "_save_model_folder", config_only)
    with pytest.raises(ModelCacheError, match=rf"incomplete model .*nothing was written to {entry}"):
        resolve_model_path(str(gguf))
    assert not entry.exists() and _leftovers(entry) == []
    monkeypatch.undo()


def test_what_cannot_be_repaired_names_the_path(fake_gguf, tmp_path, monkeypatch):
    gguf, calls = fake_gguf
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ModelCacheError, match=rf"{mine} exists but is not a converted model .*delete it"):
        convert_gguf(gguf, out_dir=mine)
    assert (mine / "notes.txt").read_text() == "keep me" and calls == []
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("HYPO_CACHE", str(blocker / "cache"))
    with pytest.raises(ModelCacheError, match=rf"cannot write in the model cache {blocker / 'cache'}"):
        resolve_model_path(str(gguf))
    assert issubclass(ModelCacheError, ValueError)  # the command line prints it as one line


RACER = """
import datetime, logging, sys, time
from pathlib import Path

import torch.distributed as dist

import hypo.models.gguf as models
from hypo.models.loading import resolve_model_path
from conftest import build_model, build_tokenizer

rank, store, gguf, log = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
tokenizer = build_tokenizer()
turn = log.parent / "rank0-resolving"


def wait_for(path):
    deadline = time.time() + 60
    while not path.exists() and time.time() < deadline:
        time.sleep(0.02)


def load(path):
    with log.open("a") as f:
        f.write(f"{rank}\\n")
    wait_for(turn)
    time.sleep(0.3)  # rank 0 is now waiting on the lock
    return build_model(tokenizer), tokenizer


models._load_gguf = load
logging.basicConfig(level=logging.INFO)
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=120))
if rank == 0:  # rank 1 converts: under torch.distributed a rank other than 0 must write the weights too
    wait_for(log)
    turn.touch()
print(resolve_model_path(gguf), flush=True)
dist.destroy_process_group()
"""


def test_two_processes_racing_on_an_empty_cache_convert_once(fake_gguf, tmp_path, tiny_tokenizer):
    gguf, _ = fake_gguf
    log = tmp_path / "conversions.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(hypo.__file__).parents[1]),
                                                        str(Path(__file__).parent)])}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(rank), str(tmp_path / "store"), str(gguf), str(log)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for rank in (0, 1)]
    outputs = [racer.communicate(timeout=300) for racer in racers]
    for racer, (_, err) in zip(racers, outputs, strict=True):
        assert racer.returncode == 0, err[-3000:]
    paths = [out.strip().splitlines()[-1] for out, _ in outputs]
    assert paths[0] == paths[1] == str(models._gguf_cache_folder(gguf))
    assert log.read_text().split() == ["1"]  # one conversion, by rank 1; rank 0 waited and reused it
    assert "Waiting for another process" in outputs[0][1]
    assert _leftovers(Path(paths[0])) == []
    _assert_usable(paths[0], tiny_tokenizer)


@pytest.mark.slow
def test_embedded_default_converts_once_and_matches_the_gguf(tmp_path, monkeypatch):
    """The embedded SmolLM2-135M-Instruct: GGUF -> safetensors folder in $HYPO_CACHE, identical logits."""
    from transformers import AutoModelForCausalLM, GgufConfig

    from hypo.models.gguf import embedded_gguf_path

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


def test_attention_kernel_is_passed_to_transformers(tiny_model_dir):
    assert load_causal_lm(str(tiny_model_dir), attn_implementation="eager").config._attn_implementation == "eager"
    assert load_causal_lm(str(tiny_model_dir)).config._attn_implementation == "sdpa"  # transformers' choice


def test_a_bfloat16_lora_base_keeps_float32_adapters_that_learn_under_checkpointing(tiny_model_dir, tiny_task):
    """The LoRA recipes' set-up: bf16 frozen base, gradient checkpointing; the adapters are float32 and get
    gradients through the checkpointed layers (the frozen embeddings give the layers no input requiring grad)."""
    from hypo.config import HyPOConfig
    from hypo.models.loading import check_adapters_float32, load_policy_and_reference

    config = HyPOConfig(model_name_or_path=str(tiny_model_dir), use_peft=True, dtype="bfloat16",
                        gradient_checkpointing=True, dataset=str(tiny_task["pairs"]))
    _, policy, reference = load_policy_and_reference(config)
    base = {p.dtype for n, p in policy.named_parameters() if "lora" not in n}
    adapters = {p.dtype for p in policy.parameters() if p.requires_grad}
    assert base == {torch.bfloat16} and adapters == {torch.float32}
    policy.train()
    ids = torch.randint(5, 300, (2, 9))
    policy(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    b_grads = [p.grad for n, p in policy.named_parameters() if "lora_B" in n]  # B = 0 at init: A's are zero
    assert len(b_grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in b_grads)
    with reference.active() as ref_model:  # the reference is the bf16 base with the adapters off
        assert ref_model is policy
    policy.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].to(torch.bfloat16)
    with pytest.raises(ValueError, match="must be float32"):
        check_adapters_float32(policy)


def test_bfloat16_weights_warn_only_when_they_train(tiny_tokenizer, caplog):
    """A handed-over bf16 policy warns (AdamW's small updates are rounded away); under LoRA the bf16 base is frozen
    and the float32 adapters train: no warning. Handed-over float16 weights are refused either way."""
    from hypo.models.loading import _check_weight_dtype

    model = build_model(tiny_tokenizer).to(torch.bfloat16)
    with caplog.at_level("WARNING", logger="hypo.models"):
        _check_weight_dtype(model, "float32", given=True)
        assert sum("rounded away" in r.getMessage() for r in caplog.records) == 1
        _check_weight_dtype(model, "float32", given=True, lora=True)
        assert sum("rounded away" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="float16 weights are refused"):
        _check_weight_dtype(model.to(torch.float16), "float32", given=True, lora=True)
