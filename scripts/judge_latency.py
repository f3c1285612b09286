"""Wall time of a judged `hypo eval` against a local OpenAI-compatible stand-in that takes LATENCY seconds per
reply, at several `--judge_concurrency` values (docs/evaluation-handoff.md quotes the numbers).

    .venv/bin/python scripts/judge_latency.py [--prompts 32] [--samples 2] [--latency 0.5] [--concurrency 1,16]

The policy and reference are the tests' tiny random Llama (tests/conftest.py), so generation takes little of
the time; the judge's reply is "A" or "B" by a hash of the request, the same at every concurrency, and each run
starts with an empty verdict cache. The results of the runs must be identical; the script checks it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stand_in(latency: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(latency)
            verdict = "AB"[hashlib.sha256(body).digest()[0] % 2]
            reply = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "stand-in",
                                "choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant", "content": verdict}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=2, help="completions per prompt (judgments = prompts x samples)")
    p.add_argument("--latency", type=float, default=0.5, help="seconds the stand-in takes per reply")
    p.add_argument("--concurrency", default="1,16", help="comma-separated --judge_concurrency values")
    args = p.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_model, build_tokenizer
    from hypo.cli.main import main as hypo
    from hypo.evaluation import held_out

    judging: list[float] = []  # seconds in `judge_rows`, the judging step of each evaluation
    judge_rows = held_out.judge_rows

    def timed_judge_rows(judge, rows):
        start = time.perf_counter()
        judge_rows(judge, rows)
        judging.append(time.perf_counter() - start)

    held_out.judge_rows = timed_judge_rows  # instrumentation of this script only

    work = Path(tempfile.mkdtemp(prefix="judge-latency-"))
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Write a short review of item {i}."}) + "\n"
                               for i in range(args.prompts)))
    server = stand_in(args.latency)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    results, seconds = {}, {}
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        out = work / f"eval-{concurrency}"
        start = time.perf_counter()
        code = hypo(["eval", "--model", str(work / "model"), "--reference", str(work / "model"), "--prompts",
                     str(prompts), "--max_prompts", str(args.prompts), "--num_samples", str(args.samples),
                     "--max_new_tokens", "8", "--judge", "llm", "--judge_base_url", url, "--judge_model", "stand-in",
                     "--judge_concurrency", str(concurrency), "--output_dir", str(out)])
        seconds[concurrency] = time.perf_counter() - start
        assert code == 0, f"hypo eval exited {code}"
        results[concurrency] = json.loads((out / "eval_results.json").read_text())["metrics"]
    server.shutdown()
    judgments = args.prompts * args.samples
    print(f"\n{judgments} judgments, stand-in latency {args.latency} s per reply")
    for (concurrency, wall), judged in zip(seconds.items(), judging, strict=True):
        print(f"  --judge_concurrency {concurrency:3d}: hypo eval {wall:6.1f} s wall, of which judging {judged:5.1f} s "
              f"(at best {-(-judgments // concurrency) * args.latency:.1f} s)")
    first = next(iter(results.values()))
    assert all(r == first for r in results.values()), "results differ between concurrencies"
    print("  results identical at every concurrency: yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
