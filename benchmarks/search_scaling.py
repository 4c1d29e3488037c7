"""Search at scale: exact Flat against the automatic index choice, on synthetic normalised 512-d clustered vectors.

    python -m benchmarks.search_scaling                      # 100k and 1M vectors (about 10 minutes, 8 GB RAM)
    python -m benchmarks.search_scaling --sizes 100000       # quicker

For each size: build time (including training and nprobe tuning for the automatic choice), index size, single-query
latency p50/p99, batched latency per query (100 queries a call), recall@10 against exact search on fresh queries.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, percentiles
from search.index_choice import DEFAULT_TARGET_RECALL, build_tuned, recall_at_k
from search.vector_index import VectorIndex


def clustered(n: int, d: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """Points around the centres plus noise (0.6 a dimension), L2-normalised, built in chunks."""
    out = np.empty((n, d), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = centres[rng.integers(0, len(centres), m)] + 0.6 * rng.standard_normal((m, d), dtype=np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def measure(index: VectorIndex, queries: np.ndarray, exact: np.ndarray, single: int) -> dict:
    latencies = []
    for q in queries[:single]:
        tick = time.perf_counter()
        index.search(q[None], 10)
        latencies.append(time.perf_counter() - tick)
    tick = time.perf_counter()
    found = np.concatenate([index.search(queries[i:i + 100], 10)[1] for i in range(0, len(queries), 100)])
    batched_ms = (time.perf_counter() - tick) / len(queries) * 1000
    p50, p99 = percentiles(latencies)
    return {"p50": p50, "p99": p99, "batched": batched_ms, "recall": recall_at_k(found, exact)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--target-recall", type=float, default=DEFAULT_TARGET_RECALL)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--cluster-scale", type=float, default=0.45, help="centre size against noise 0.6 a dim")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    rng = np.random.default_rng(0)
    # broad overlapping clusters (defaults: 100, within-cluster cosine ~0.36), each spanning many IVF cells, as
    # neighbourhoods of real embeddings do; --cluster-scale 0 gives uniform vectors, the worst case for IVF
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32) * args.cluster_scale

    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        base = clustered(n, args.dim, rng, centres)
        queries = clustered(args.queries, args.dim, rng, centres)  # fresh points, never in the base
        tuning = clustered(500, args.dim, rng, centres)
        tick = time.perf_counter()
        flat = VectorIndex.build(base, "Flat")
        flat_build = time.perf_counter() - tick
        exact = flat.search(queries, 10)[1]
        single = 30 if n >= 500_000 else 100  # exact search at 1M costs ~0.3 s a query
        tick = time.perf_counter()
        auto, report = build_tuned(base, target_recall=args.target_recall, queries=tuning)
        auto_build = time.perf_counter() - tick
        automatic = f"auto: {report.factory} {report.params}"
        for name, index, seconds in (("Flat (exact)", flat, flat_build), (automatic, auto, auto_build)):
            index.save(work / "index.faiss")
            size = (work / "index.faiss").stat().st_size
            rows.append((n, name, seconds, size, measure(index, queries, exact, single)))
        del flat, auto, base

    print(machine())
    print(f"synthetic {args.dim}-d normalised vectors in {args.clusters} clusters (scale {args.cluster_scale}); "
          f"{args.queries} fresh queries; recall@10 against exact search; target recall {args.target_recall}\n")
    print("| vectors | index | build s | size MB | single query p50 ms | p99 ms | batched ms/query | recall@10 |")
    print("|---|---|---|---|---|---|---|---|")
    for n, name, seconds, size, m in rows:
        print(f"| {n:,} | {name} | {seconds:.1f} | {size / 1e6:.0f} | {m['p50']:.2f} | {m['p99']:.2f} | "
              f"{m['batched']:.3f} | {m['recall']:.3f} |")


if __name__ == "__main__":
    main()
