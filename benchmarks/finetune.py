"""Fine-tuning benchmark: test-split recall@k before and after training, training throughput, recall vs time.

Runs the demo's recipe (generated scenes, small CLIP from random weights) unless --model/--pretrained name a
starting point. Prints a table; measures everything in this run.

    python -m benchmarks.finetune                         # the demo's full recipe (~10 min on 2 CPU cores)
    python -m benchmarks.finetune --epochs 2 --n-train 2000   # a quicker look
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine
from demo.prepare import DEMO_MODEL_CONFIG, DemoConfig
from demo.scenes import IMAGE_DIR, generate
from indexer.finetune import FinetuneConfig, Trainer, load_for_training, validate
from indexer.readers import read_dataset


def row(name: str, metrics: dict) -> str:
    t, i = metrics["text_to_image"], metrics["image_to_text"]
    return (f"| {name} | {t['R@1']:.1f} / {t['R@5']:.1f} / {t['R@10']:.1f} | "
            f"{i['R@1']:.1f} / {i['R@5']:.1f} / {i['R@10']:.1f} |")


def main() -> None:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="scene dataset folder (generated if missing)")
    parser.add_argument("--n-train", type=int, default=defaults.n_train)
    parser.add_argument("--n-test", type=int, default=defaults.n_test)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--model", default=str(DEMO_MODEL_CONFIG))
    parser.add_argument("--pretrained", default="none")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    data = args.data or work / "scenes"
    if not (data / "Flickr8k.token.txt").is_file():
        generate(data, args.n_train, 500, args.n_test, seed=0)
    token, images = data / "Flickr8k.token.txt", data / IMAGE_DIR
    train = read_dataset("flickr8k", token, images, "train")
    test = read_dataset("flickr8k", token, images, "test")

    task, from_random = load_for_training(args.model, args.pretrained, work / "model", None, 0)
    before = validate(task.encoder, test, images)
    config = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, workers=1, progress=False)
    trainer = Trainer(task, train, None, images, work / "model", config, {"bench": True}, from_random)
    history = []
    started = time.perf_counter()

    def measure(record):  # test recall after every epoch: recall against training time (the model is in eval mode)
        history.append((record["epoch"], time.perf_counter() - started, record["pairs_per_second"],
                        validate(task.encoder, test, images)))

    trainer.fit(on_epoch=measure)
    train_seconds = sum(r["seconds"] for r in trainer.run["history"])

    print(f"\n{machine()}")
    print(f"train split: {len(train)} images; test split: {len(test)} images, {5 * len(test)} captions; "
          f"model: {args.model} ({args.pretrained})\n")
    print("| model | text→image R@1 / R@5 / R@10 | image→text R@1 / R@5 / R@10 |")
    print("|---|---|---|")
    print(row("before fine-tuning", before))
    print(row(f"after {len(history)} epochs", history[-1][3]))
    rates = [h[2] for h in history]
    print(f"\ntraining throughput: median {np.median(rates):.0f} pairs/s over {len(rates)} epochs "
          f"({train_seconds:.0f} s of training, excluding per-epoch evaluation)\n")
    print("| epoch | minutes (incl. eval) | pairs/s | text→image R@1 / R@5 / R@10 | image→text R@1 / R@5 / R@10 |")
    print("|---|---|---|---|---|")
    for epoch, seconds, rate, metrics in history:
        print(row(f"{epoch} | {seconds / 60:.1f} | {rate:.0f}", metrics))


if __name__ == "__main__":
    main()
