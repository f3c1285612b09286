"""Make the bundled default task "reviews" (src/hypo/tasks/reviews/).

Prompts ask for a short review of an item (a novel, a café, a phone, ...). The items are built
combinatorially from the word lists below with a seeded `random.Random`, then split into three
disjoint sets: held-out evaluation prompts, unlabeled prompts for the online term, and prompts for
the offline preference pairs.

The pair responses come from a behaviour policy that is not the reference model: the embedded
SmolLM2-135M-Instruct prompted with persona system messages (the reference policy sees the model's
default system prompt instead). Each pair prompt gets two different personas and one sampled
response from each; the gold judge "review-sentiment" picks `chosen` (higher score) and
`rejected`; exact ties are dropped.

Run (the defaults reproduce the shipped files):

    HYPO_CACHE=/tmp/hypo-cache .venv/bin/python scripts/make_default_task.py
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

from hypo.tasks.reviews.judge import NEGATIVE_WORDS, POSITIVE_WORDS, ReviewSentimentJudge

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "hypo" / "tasks" / "reviews"

ADJECTIVES = [
    "Quiet", "Silver", "Golden", "Hidden", "Crimson", "Velvet", "Northern", "Painted", "Wandering",
    "Lucky", "Electric", "Paper", "Midnight", "Copper", "Distant", "Bright", "Salt", "Winter",
    "Little", "Wild", "Amber", "Gentle", "Iron", "Scarlet",
]  # fmt: skip
NOUNS = [
    "Harbor", "Lantern", "Orchard", "Fox", "River", "Garden", "Compass", "Meadow", "Anchor",
    "Sparrow", "Bridge", "Tide", "Maple", "Comet", "Kettle", "Island", "Window", "Falcon", "Valley",
    "Clock", "Feather", "Lighthouse", "Cedar", "Pebble",
]  # fmt: skip
BRANDS = [
    "Nova", "Orbit", "Kestrel", "Zephyr", "Atlas", "Pulse", "Vertex", "Lumen", "Summit", "Echo",
    "Strider", "Cobalt",
]  # fmt: skip
MODELS = ["One", "Two", "X", "Pro", "Lite", "Max", "Air", "Plus", "S", "Go", "Neo", "Prime"]

# kind -> how its names are built ("title": "The Quiet Harbor", "place": "Quiet Harbor",
# "product": "Nova Pro")
KINDS = {
    "movie": "title",
    "novel": "title",
    "album": "title",
    "podcast": "title",
    "board game": "title",
    "video game": "title",
    "TV series": "title",
    "café": "place",
    "hotel": "place",
    "restaurant": "place",
    "bakery": "place",
    "bookshop": "place",
    "phone": "product",
    "pair of running shoes": "product",
    "laptop": "product",
    "pair of headphones": "product",
    "coffee maker": "product",
    "backpack": "product",
}

TEMPLATES = [
    "Write a short review of the {kind} '{name}'.",
    "Write a brief review of the {kind} called '{name}'.",
    "Review the {kind} '{name}' in two or three sentences.",
    "Give me a short review of '{name}', {a_kind}.",
]

PERSONAS = {
    "fan": "You are an enthusiastic fan who loves discovering new things. You write warm, excited reviews.",
    "critic": "You are a harsh critic with very high standards. You point out flaws bluntly.",
    "journalist": "You are a neutral journalist. You write balanced, factual reviews.",
    "blogger": "You are a sarcastic blogger. You write witty, ironic reviews.",
}

TEMPERATURE = 0.9
TOP_P = 0.95


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def make_items(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """`n` distinct (kind, name) items; no name is used twice, even across kinds."""
    names = {
        "title": [f"The {a} {b}" for a in ADJECTIVES for b in NOUNS],
        "place": [f"{a} {b}" for a in ADJECTIVES for b in NOUNS],
        "product": [f"{a} {b}" for a in BRANDS for b in MODELS],
    }
    # A name word in a lexicon would be scored whenever a response repeats the item's name.
    clash = {w.lower() for w in ADJECTIVES + NOUNS + BRANDS + MODELS} & (POSITIVE_WORDS | NEGATIVE_WORDS)
    assert not clash, f"item name words in the judge lexicons: {sorted(clash)}"
    candidates = [(kind, name) for kind, style in KINDS.items() for name in names[style]]
    rng.shuffle(candidates)
    items, used = [], set()
    for kind, name in candidates:
        key = name.removeprefix("The ")
        if key in used:
            continue
        used.add(key)
        items.append((kind, name))
        if len(items) == n:
            return items
    raise ValueError(f"only {len(items)} distinct items available, {n} requested")


def make_prompt(rng: random.Random, kind: str, name: str) -> str:
    return rng.choice(TEMPLATES).format(kind=kind, name=name, a_kind=_article(kind))


def generate(model, tokenizer, conversations, *, max_new_tokens, batch_size, seed, label):
    """Sample one response per conversation (batched, left padding, KV cache)."""
    import torch

    outputs = []
    n_batches = (len(conversations) + batch_size - 1) // batch_size
    start = time.perf_counter()
    for b in range(n_batches):
        batch = conversations[b * batch_size : (b + 1) * batch_size]
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(seed * 100_003 + b)
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=TEMPERATURE,
                top_p=TOP_P,
                top_k=0,
                max_new_tokens=max_new_tokens,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        outputs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        elapsed = time.perf_counter() - start
        print(f"  {label}: batch {b + 1}/{n_batches} done, {elapsed:.0f} s", flush=True)
    return outputs


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the shipped task)")
    p.add_argument("--n-pairs", type=int, default=256, help="preference pairs to keep")
    p.add_argument("--n-prompts", type=int, default=128, help="unlabeled prompts for the online term")
    p.add_argument("--n-eval", type=int, default=64, help="held-out evaluation prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per generate call (even)")
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip scoring reference-model samples on the eval prompts (only used for the data card)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.batch_size < 2 or args.batch_size % 2:
        raise SystemExit("--batch-size must be an even number >= 2")
    import torch

    from hypo.models.loading import load_causal_lm, load_tokenizer, resolve_model_path

    torch.set_num_threads(2)
    rng = random.Random(args.seed)
    # Enough items for the splits plus a pool of pair prompts with room for dropped ties.
    n_pool = args.n_pairs + max(64, args.n_pairs // 2)
    items = make_items(rng, args.n_eval + args.n_prompts + n_pool)
    prompts = [make_prompt(rng, kind, name) for kind, name in items]
    assert len(set(prompts)) == len(prompts)
    eval_prompts = prompts[: args.n_eval]
    online_prompts = prompts[args.n_eval : args.n_eval + args.n_prompts]
    pool = prompts[args.n_eval + args.n_prompts :]
    persona_names = list(PERSONAS)
    persona_pairs = [tuple(rng.sample(persona_names, 2)) for _ in pool]

    path = resolve_model_path(None)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path)
    model.eval()
    judge = ReviewSentimentJudge()

    t0 = time.perf_counter()
    pairs, ties, n_candidates = [], 0, 0
    per_chunk = args.batch_size // 2
    chunk = 0
    while len(pairs) < args.n_pairs:
        lo = chunk * per_chunk
        if lo >= len(pool):
            raise SystemExit(f"ran out of pair prompts: {len(pairs)} pairs after {ties} ties")
        chunk_prompts = pool[lo : lo + per_chunk]
        chunk_personas = persona_pairs[lo : lo + per_chunk]
        conversations = [
            [{"role": "system", "content": PERSONAS[persona]}] + _user(prompt)
            for prompt, two in zip(chunk_prompts, chunk_personas, strict=True)
            for persona in two
        ]
        responses = generate(
            model,
            tokenizer,
            conversations,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed + chunk,
            label=f"pairs chunk {chunk + 1}",
        )
        for i, (prompt, (pa, pb)) in enumerate(zip(chunk_prompts, chunk_personas, strict=True)):
            ra, rb = responses[2 * i], responses[2 * i + 1]
            sa, sb = judge.score(prompt, ra), judge.score(prompt, rb)
            n_candidates += 1
            if sa == sb:
                ties += 1
                continue
            if sa < sb:
                ra, rb, sa, sb, pa, pb = rb, ra, sb, sa, pb, pa
            pairs.append(
                {
                    "prompt": _user(prompt),
                    "chosen": [{"role": "assistant", "content": ra}],
                    "rejected": [{"role": "assistant", "content": rb}],
                    "chosen_score": sa,
                    "rejected_score": sb,
                    "chosen_behaviour": pa,
                    "rejected_behaviour": pb,
                }
            )
        print(f"pairs: {len(pairs)}/{args.n_pairs} kept, {ties} ties dropped", flush=True)
        chunk += 1
    pairs = pairs[: args.n_pairs]
    gen_seconds = time.perf_counter() - t0

    baseline = None
    if not args.no_baseline:
        # Reference policy (default system prompt) on the eval prompts: context for the data card only.
        samples = generate(
            model,
            tokenizer,
            [_user(p) for p in eval_prompts],
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed + 10_000,
            label="reference on eval prompts",
        )
        baseline = statistics.mean(judge.score(p, s) for p, s in zip(eval_prompts, samples, strict=True))
    total_seconds = time.perf_counter() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(args.out / "pairs.jsonl", pairs)
    _write_jsonl(args.out / "prompts.jsonl", [{"prompt": _user(p)} for p in online_prompts])
    _write_jsonl(args.out / "eval_prompts.jsonl", [{"prompt": _user(p)} for p in eval_prompts])
    stats = {
        "n_pairs": len(pairs),
        "n_prompts": len(online_prompts),
        "n_eval": len(eval_prompts),
        "n_candidates": n_candidates,
        "ties": ties,
        "kept_before_truncation": n_candidates - ties,
        "mean_chosen": statistics.mean(r["chosen_score"] for r in pairs),
        "mean_rejected": statistics.mean(r["rejected_score"] for r in pairs),
        "mean_margin": statistics.mean(r["chosen_score"] - r["rejected_score"] for r in pairs),
        # Lexicon and length terms equal: the pair is decided by the diversity term alone (< 0.01).
        "diversity_only": sum(r["chosen_score"] - r["rejected_score"] < 0.01 for r in pairs),
        "chosen_by": Counter(r["chosen_behaviour"] for r in pairs),
        "rejected_by": Counter(r["rejected_behaviour"] for r in pairs),
        "baseline": baseline,
        "gen_minutes": gen_seconds / 60,
        "total_minutes": total_seconds / 60,
    }
    (args.out / "README.md").write_text(data_card(args, stats), encoding="utf-8")
    print(json.dumps({k: v for k, v in stats.items()}, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


def data_card(args: argparse.Namespace, s: dict) -> str:
    defaults = parse_args([])
    flags = [
        f"--{name.replace('_', '-')} {value}"
        for name, value in vars(args).items()
        if name not in ("out", "no_baseline") and value != getattr(defaults, name)
    ]
    if args.no_baseline:
        flags.append("--no-baseline")
    if args.out.resolve() != DEFAULT_OUT.resolve():
        flags.append(f"--out {args.out}")
    command = " ".join(["HYPO_CACHE=/tmp/hypo-cache .venv/bin/python scripts/make_default_task.py", *flags])
    personas = "\n".join(
        f"| `{k}` | {v} | {s['chosen_by'][k]} | {s['rejected_by'][k]} |" for k, v in PERSONAS.items()
    )
    baseline = (
        f"{s['baseline']:.3f} (one sample per eval prompt from the reference policy, same sampling settings)"
        if s["baseline"] is not None
        else "not computed (`--no-baseline`)"
    )
    kinds = textwrap.fill(", ".join(KINDS), width=92, subsequent_indent="   ")
    return f"""# Task "reviews" (the default task)

Short reviews of made-up items. The gold judge is `review-sentiment`
(`hypo.tasks.reviews.judge.ReviewSentimentJudge`): it prefers positive, non-repetitive reviews of at most 60
words. It labels the offline pairs and scores evaluations; it is never a training reward.

## Files

| file | rows | content |
| --- | --- | --- |
| `pairs.jsonl` | {s["n_pairs"]} | offline preference pairs (TRL conversational format) |
| `prompts.jsonl` | {s["n_prompts"]} | unlabeled prompts for the online term |
| `eval_prompts.jsonl` | {s["n_eval"]} | held-out evaluation prompts |

Pair rows: `{{"prompt": [{{"role": "user", ...}}], "chosen": [{{"role": "assistant", ...}}],
"rejected": [{{"role": "assistant", ...}}]}}` plus provenance keys `chosen_score`,
`rejected_score` (judge scores) and `chosen_behaviour`, `rejected_behaviour` (persona names).
Prompt rows: `{{"prompt": [{{"role": "user", "content": ...}}]}}`. No prompt stores a system
message: the model's chat template adds its default one, which is the reference policy's context.
The three prompt sets are disjoint, and no item name occurs in two of them.

## How it was made

    {command}

1. Items: (kind, name) pairs from word lists in the script, shuffled with
   `random.Random({args.seed})`. Kinds:
   {kinds}.
   Names are like "The Quiet Harbor" (media),
   "Silver Lantern" (places) or "Nova Pro" (products); no name is used twice. Each item gets
   one of {len(TEMPLATES)} prompt templates, e.g. "{TEMPLATES[0]}".
2. Split: the first {s["n_eval"]} prompts are the eval prompts, the next {s["n_prompts"]} the
   online prompts, the rest form the pool for pairs.
3. Behaviour policy (not the reference): the embedded SmolLM2-135M-Instruct with a persona
   system message. Each pair prompt gets two different personas (drawn with the same
   `random.Random`) and one response from each: sampling with temperature {TEMPERATURE},
   top-p {TOP_P}, no top-k, at most {args.max_new_tokens} new tokens, batches of
   {args.batch_size} sequences (left padding, KV cache), `torch.manual_seed` set per batch;
   only the new tokens are decoded (`skip_special_tokens=True`) and whitespace is stripped.
4. Labels: the response with the higher judge score is `chosen`. Candidate pairs with equal
   scores are dropped; pool prompts are used in order until {s["n_pairs"]} pairs are kept.

| persona | system message | chosen | rejected |
| --- | --- | --- | --- |
{personas}

## Statistics

- candidate pairs generated: {s["n_candidates"]}; dropped as exact ties: {s["ties"]};
  kept: {s["kept_before_truncation"]} (first {s["n_pairs"]} stored)
- mean judge score, chosen: {s["mean_chosen"]:.3f}; rejected: {s["mean_rejected"]:.3f};
  mean margin: {s["mean_margin"]:.3f}
- pairs decided by the diversity term alone (equal lexicon and length terms, margin < 0.01):
  {s["diversity_only"]} of {s["n_pairs"]}
- mean judge score of the reference policy on the eval prompts:
  {baseline}
- generation time: {s["gen_minutes"]:.1f} min for the pairs, {s["total_minutes"]:.1f} min in total
  (2 CPU threads on a machine shared with other jobs, float32)

Sampling on CPU is reproducible on the same machine and library versions; other hardware or
versions may give different text (the judge scores stored in the file always match the text).

## Gold judge formula

With `tokens` the lowercase word tokens of the response (regex `[a-z]+('[a-z]+)*`, curly
apostrophes read as straight) and `n = len(tokens)`:

- a token in the positive lexicon has polarity +1, in the negative lexicon -1; it is flipped if
  one of the 2 tokens before it in the same clause (clauses split on `. , ; : ! ? ( )` and
  newlines) is `not`, `no`, `never`, `hardly` or ends in `n't`;
- `P` / `N` = number of distinct lexicon words seen with polarity +1 / -1;
- `score = P - N - 0.05 * max(0, n - 60) - (1.0 if n < 3 else 0) + 0.01 * len(set(tokens)) / n`.

The lexicons (about 100 words each) are in `src/hypo/tasks/reviews/judge.py`. The prompt is not used.
"""


if __name__ == "__main__":
    sys.exit(main())
