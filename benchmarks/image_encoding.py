"""Image encoding throughput: model-only forward, the plain open_clip loop, and our build pipeline per runtime and
precision (torch fp32/int8/bf16, ONNX Runtime fp32/int8).

    python -m benchmarks.image_encoding                     # ViT-B-32, random weights (same cost as real ones)
    python -m benchmarks.image_encoding --demo-dir demo_data  # also recall@k per variant on the trained demo model

Model-only: `encode_pixels` on tensors preprocessed in advance. Plain loop: open, convert, open_clip preprocess,
stack, encode, batch after batch (what a user writes first). Pipeline: `indexer build`'s code (threads decode and
preprocess ahead of the model; exact decoding, see fast_decode.py for --fast-decode) writing a real index. Medians over --repeats runs; cosine is the
mean cosine similarity of each precision's embeddings to the plain fp32 loop's.
"""
from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import encoding_parser, machine, photo_like_images
from indexer.pipeline import BuildConfig, build_index
from indexer.readers import Sample, read_dataset
from search.evaluation import evaluate
from search.encoders import EncoderSpec, create_encoder
from search.openclip.local_dir import save_local_dir
from search.store import open_index


def plain_loop(encoder, paths, batch_size):
    out = []
    for start in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[start:start + batch_size]]
        out.append(encoder.encode_pixels(np.stack([encoder.preprocess_image(im) for im in images])))
    return np.concatenate(out)


def pipeline(encoder, root: Path, samples, batch_size, work: Path):
    out = Path(tempfile.mkdtemp(dir=work)) / "index"
    build_index(samples, root, encoder, out, BuildConfig(batch_size=batch_size, progress=False))
    return np.load(out / "image_vectors.npy")


def main() -> None:
    parser = encoding_parser(__doc__, 192, None, "trained demo: recall@k per runtime and precision")
    parser.add_argument("--variants", default="torch:fp32,torch:int8,torch:bf16,onnx:fp32,onnx:int8",
                        help="RUNTIME:PRECISION pairs (the ONNX towers are exported once, before the timings)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    work = Path(tempfile.mkdtemp(prefix="bench-images-"))
    paths = photo_like_images(work / "photos", args.n)
    samples = [Sample(p.name) for p in paths]
    spec = EncoderSpec.from_args(args.model, args.pretrained)
    if spec.pretrained == "none":  # every load draws new random weights: draw once, load each precision from it
        first = create_encoder(spec)
        spec = EncoderSpec.from_args(f"local-dir:{save_local_dir(first, work / 'model')}", None)
        del first
    variants = [tuple(v.split(":")) for v in args.variants.split(",")]
    encoders = {f"{r} {p}": create_encoder(spec, r, batch_size=args.batch_size, precision=p) for r, p in variants}
    fp32 = create_encoder(spec, "torch", batch_size=args.batch_size)
    for encoder in encoders.values():
        encoder.fingerprint  # hashed once at load time, not per image: keep it out of the timings

    pixels = np.stack([fp32.preprocess_image(Image.open(p).convert("RGB")) for p in paths])
    fp32.encode_pixels(pixels[:args.batch_size])  # warm-up
    rows = {}
    reference = None
    for _ in range(args.repeats):
        tick = time.perf_counter()
        fp32.encode_pixels(pixels)
        rows.setdefault("model-only forward (torch fp32)", []).append(args.n / (time.perf_counter() - tick))
        tick = time.perf_counter()
        reference = plain_loop(fp32, paths, args.batch_size)
        rows.setdefault("plain open_clip loop (torch fp32)", []).append(args.n / (time.perf_counter() - tick))
    cosines = {"plain open_clip loop (torch fp32)": 1.0}
    for variant, encoder in encoders.items():
        name = f"pipeline ({variant})"
        for _ in range(args.repeats):
            tick = time.perf_counter()
            vectors = pipeline(encoder, work / "photos", samples, args.batch_size, work)
            rows.setdefault(name, []).append(args.n / (time.perf_counter() - tick))
        cosines[name] = float(np.mean(np.sum(vectors * reference, axis=1)))

    model_only = statistics.median(rows["model-only forward (torch fp32)"])
    plain = statistics.median(rows["plain open_clip loop (torch fp32)"])
    print(machine())
    print(f"{args.model} ({args.pretrained}), {args.n} photo-like 640x480 JPEGs, batch {args.batch_size}, "
          f"median of {args.repeats} runs\n")
    print("| path | images/s | vs model-only fp32 | vs plain loop fp32 | mean cosine to plain fp32 |")
    print("|---|---|---|---|---|")
    for name, rates in rows.items():
        rate = statistics.median(rates)
        cosine = f"{cosines[name]:.5f}" if name in cosines else "—"
        print(f"| {name} | {rate:.1f} | {rate / model_only:.2f}x | {rate / plain:.2f}x | {cosine} |")

    if args.demo_dir:
        token = args.demo_dir / "scenes" / "Flickr8k.token.txt"
        images = args.demo_dir / "scenes" / "Flicker8k_Dataset"
        test = read_dataset("flickr8k", token, images, "test")
        demo_spec = EncoderSpec.from_args(f"local-dir:{args.demo_dir / 'model'}", None)
        print(f"\nrecall@k on the demo's test split ({len(test)} images) per runtime and precision:\n")
        print("| runtime precision | text→image R@1 / R@5 / R@10 | image→text R@1 / R@5 / R@10 |")
        print("|---|---|---|")
        for runtime, precision in variants:
            out = Path(tempfile.mkdtemp(dir=work)) / "index"
            demo = create_encoder(demo_spec, runtime, precision=precision)
            build_index(test, images, demo, out, BuildConfig(progress=False))
            m = evaluate(open_index(out)).to_json()
            t, i = m["text_to_image"], m["image_to_text"]
            print(f"| {runtime} {precision} | {t['R@1']:.2f} / {t['R@5']:.2f} / {t['R@10']:.2f} | "
                  f"{i['R@1']:.2f} / {i['R@5']:.2f} / {i['R@10']:.2f} |")


if __name__ == "__main__":
    main()
