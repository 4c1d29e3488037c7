"""Text encoding: open_clip's full 77-token forward against ours, trimmed to the batch's longest real sequence.

    python -m benchmarks.text_encoding            # ViT-B-32 text tower, random weights (same cost as real ones)

Single queries (one caption at a time, as the web API sees them) and batches of 256 captions (as indexing sees them);
median latency over the runs, and the largest difference between the two paths' embeddings.
"""
from __future__ import annotations

import argparse
import logging
import random
import statistics
import time

import numpy as np
import torch

from benchmarks.common import machine, percentiles
from search.encoders import EncoderSpec, create_encoder

WORDS = ("a dog runs on the beach near two children with a red ball while the sun sets behind the old wooden pier "
         "and a man in a blue shirt watches from a bench").split()


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 16))) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    encoder = create_encoder(EncoderSpec.from_args(args.model, args.pretrained), batch_size=args.batch)
    full = lambda texts: _full(encoder, texts)  # noqa: E731
    trimmed = encoder.encode_texts
    singles = captions(args.queries)
    batch = captions(args.batch, seed=1)
    for fn in (full, trimmed):
        fn(singles[:4])  # warm-up

    results = {}
    for name, fn in (("full length (open_clip encode_text)", full), ("trimmed (ours)", trimmed)):
        latencies = []
        for text in singles:
            tick = time.perf_counter()
            fn([text])
            latencies.append(time.perf_counter() - tick)
        batch_rates = []
        for _ in range(args.repeats):
            tick = time.perf_counter()
            fn(batch)
            batch_rates.append(len(batch) / (time.perf_counter() - tick))
        results[name] = (percentiles(latencies), statistics.median(batch_rates))
    difference = float(np.abs(full(batch) - trimmed(batch)).max())
    by_length = []  # single-query latency depends on the query's length: show it rather than one average
    for words in (2, 5, 10, 20):
        text = " ".join(WORDS[:words])
        full_ms = statistics.median(_seconds(full, text) for _ in range(20)) * 1000
        trim_ms = statistics.median(_seconds(trimmed, text) for _ in range(20)) * 1000
        by_length.append((words, len(encoder.tokenize([text])[0].nonzero()), full_ms, trim_ms))

    print(machine())
    print(f"{args.model} text tower ({args.pretrained}); {args.queries} single queries of 5-16 words; batches of "
          f"{args.batch}, median of {args.repeats}\n")
    print("| path | single query p50 ms | p99 ms | batch captions/s |")
    print("|---|---|---|---|")
    for name, ((p50, p99), rate) in results.items():
        print(f"| {name} | {p50:.1f} | {p99:.1f} | {rate:.0f} |")
    (full_p50, _), full_rate = results["full length (open_clip encode_text)"]
    (trim_p50, _), trim_rate = results["trimmed (ours)"]
    print("\n| query words | tokens | full length p50 ms | trimmed p50 ms | speed-up |")
    print("|---|---|---|---|---|")
    for words, tokens, full_ms, trim_ms in by_length:
        print(f"| {words} | {tokens} | {full_ms:.1f} | {trim_ms:.1f} | {full_ms / trim_ms:.1f}x |")
    print(f"\nspeed-up: single query {full_p50 / trim_p50:.1f}x (p50), batch {trim_rate / full_rate:.1f}x; "
          f"max abs difference of the embeddings: {difference:.2e}")


def _seconds(fn, text: str) -> float:
    tick = time.perf_counter()
    fn([text])
    return time.perf_counter() - tick


@torch.inference_mode()
def _full(encoder, texts):
    tokens = encoder.tokenize(texts)
    out = [torch.nn.functional.normalize(encoder.model.encode_text(tokens[i:i + 256]).float(), dim=-1)
           for i in range(0, len(tokens), 256)]
    return torch.cat(out).numpy()


if __name__ == "__main__":
    main()
