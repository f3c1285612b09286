"""Rows per second of loading preference data: generate rows in a real dataset's layout, then read and tokenize
them with hypo.data as `hypo train` does (docs/data.md has the numbers measured with it).

Usage: python scripts/bench_data_loading.py TOKENIZER [--layout ultrafeedback|conversational|tldr] [--rows 60000]
       [--pairs_per_prompt 1] [--keep FILE]
TOKENIZER is a local tokenizer folder (e.g. the embedded SmolLM2 model converted by hypo in ~/.cache/hypo/models).
Run it alone: these machines are shared and a second process changes the result a lot.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

_WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do their "
         "time if will way about many then them write would like so these her long make thing see him two has look "
         "more day could go come did number sound no most people my over know water than call first who may down "
         "side been now find summary post reddit girlfriend relationship months years friend job money help advice "
         "think feel really want")
WORDS = _WORDS.split(" ")


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def make_rows(layout: str, count: int, pairs_per_prompt: int, seed: int = 0) -> list[dict]:
    """`count` rows; `pairs_per_prompt` consecutive rows share a prompt."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        if i % pairs_per_prompt == 0:
            prompt = _text(rng, 40, 160) if layout != "tldr" else \
                f"SUBREDDIT: r/relationships\n\nTITLE: {_text(rng, 8, 12)}\n\nPOST: {_text(rng, 100, 400)}\n\nTL;DR:"
        if layout == "tldr":
            rows.append({"prompt": prompt, "chosen": " " + _text(rng, 10, 40), "rejected": " " + _text(rng, 10, 40)})
            continue
        chosen, rejected = _text(rng, 80, 300), _text(rng, 80, 300)
        if layout == "ultrafeedback":  # HuggingFaceH4/ultrafeedback_binarized, train_prefs
            user = {"role": "user", "content": prompt}
            rows.append({"prompt": prompt, "prompt_id": f"{i:064x}",
                         "chosen": [user, {"role": "assistant", "content": chosen}],
                         "rejected": [user, {"role": "assistant", "content": rejected}],
                         "messages": [user, {"role": "assistant", "content": chosen}],
                         "score_chosen": 8.0, "score_rejected": 5.0})
        else:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def main() -> None:
    from transformers import AutoTokenizer

    from hypo.data.encoding import tokenize_preference_rows
    from hypo.data.files import read_located_rows

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokenizer")
    parser.add_argument("--layout", choices=["ultrafeedback", "conversational", "tldr"], default="ultrafeedback")
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--pairs_per_prompt", type=int, default=1)
    parser.add_argument("--keep", default=None, help="Write the generated JSONL here (default: a temporary file).")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    path = Path(args.keep or tempfile.mkstemp(suffix=".jsonl")[1])
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(args.layout, args.rows, args.pairs_per_prompt)))
    load = os.getloadavg()[0]
    start = time.perf_counter()
    rows, wheres = read_located_rows(str(path), strict=False)
    read = time.perf_counter()
    items, report = tokenize_preference_rows(rows, tokenizer, source=str(path), row_locations=wheres, max_length=1024,
                                             max_prompt_length=512, max_completion_length=512)
    done = time.perf_counter()
    print(f"{args.layout}, {args.rows} rows ({args.pairs_per_prompt} per prompt), load average {load:.1f}: "
          f"read {read - start:.1f} s, tokenize {done - read:.1f} s ({args.rows / (done - read):.0f} rows/s), "
          f"{report.rows_kept} kept")
    if not args.keep:
        path.unlink()


if __name__ == "__main__":
    main()
