"""CPU speed of the recommended models (search/model_catalog.py) with random weights, for `python -m search models`.

    python -m benchmarks.model_speed                          # every catalog model; writes search/model_speeds.json
    python -m benchmarks.model_speed --models MobileCLIP2-S0 --no-write   # a subset (ViT-B-32 joins as the baseline)

open_clip.create_model(NAME, pretrained=None): random weights have the shapes, hence the cost, of the real ones. fp32,
torch. images/s: the image tower's forward only (no decoding or preprocessing), median of a few batches of 32 after a
warm-up (fewer, smaller batches for the huge models, said in their notes). Text: one query of 12 tokens as
search.openclip's encoder runs it (CLIP's causal towers trimmed to the query, other towers at their full context
length), median of 20 after warm-up. Each model is also shown as a ratio to ViT-B-32 measured in the same run.

Timed in CPU time on ONE thread: on a machine shared with other jobs, wall-clock time at 2 threads swung 3-4x with
their load (ViT-B-32: 3.6 images/s while other jobs ran, 16 on 2 idle cores), while one thread's CPU time stays within
a few % and equals its wall-clock time on an idle core. So the numbers are per core; 2 idle cores run a batch up to
twice as fast (ViT-B-32: 11.8 images/s per core here, 16 on 2 idle cores).

Hugging Face text towers (XLM-R, NLLB) need only their config for random weights, and it cannot be downloaded here:
the benchmark writes it locally with the published sizes; the parameter count is printed to compare with open_clip's
published one (366.12 M for xlm-roberta-base-ViT-B-32, 507.47 M for nllb-clip-base-siglip).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import statistics
import time

import torch

from benchmarks.common import machine
from search.model_catalog import SPEEDS_FILE, Speed, Speeds, load_speeds, model_names

THREADS = 1  # CPU time of one thread: stable under other jobs' load (see above)
BATCH = 32
BATCHES = 3
WARM_UP = 4  # images in the warm-up batch
TEXT_REPEATS = 20
QUERY_TOKENS = 12
BASELINE = "ViT-B-32"
# images per batch and batches where 3 batches of 32 would take minutes on one core
SMALL_BATCHES = {"ViT-SO400M-14-SigLIP-384": (4, 2), "nllb-clip-base-siglip": (BATCH, 2)}


def _hf_configs() -> dict:
    """The HF text towers' configs with the published sizes (xlm-roberta-base; facebook/nllb-200-distilled-600M)."""
    from transformers import M2M100Config, XLMRobertaConfig

    return {
        "xlm-roberta-base": (lambda: XLMRobertaConfig(
            vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
            eos_token_id=2), "XLM-R base: 12 layers, 768 wide, vocabulary 250,002"),
        "facebook/nllb-200-distilled-600M": (lambda: M2M100Config(
            vocab_size=256206, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
            decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024,
            scale_embedding=True, activation_function="relu", pad_token_id=1, bos_token_id=0, eos_token_id=2,
            decoder_start_token_id=2), "NLLB-200 distilled 600M encoder: 12 layers, 1024 wide, vocabulary 256,206"),
    }


@contextlib.contextmanager
def _local_hf_configs(used: list[str]):
    """open_clip asks the hub for a HF text tower's config even for random weights: answer from _hf_configs()."""
    from open_clip import hf_model

    configs = _hf_configs()
    original = hf_model.AutoConfig.from_pretrained

    def from_pretrained(name, *args, **kwargs):
        make, description = configs[name]
        used.append(description)
        return make()

    hf_model.AutoConfig.from_pretrained = from_pretrained
    try:
        yield
    finally:
        hf_model.AutoConfig.from_pretrained = original


def build(name: str) -> tuple[torch.nn.Module, list[str]]:
    """The model with random weights, ready for inference, and notes on how it was built."""
    import open_clip

    notes: list[str] = []
    hf_used: list[str] = []
    with _local_hf_configs(hf_used):
        model = open_clip.create_model(name, pretrained=None, pretrained_text=False).eval()
    if hf_used:
        params = sum(p.numel() for p in model.parameters()) / 1e6
        notes.append(f"text tower from a config written here ({hf_used[0]}; {params:.2f} M parameters in all)")
    if name.startswith("MobileCLIP"):  # its inference form: the training branches folded (timm)
        from timm.utils.model import reparameterize_model

        model = reparameterize_model(model)
        notes.append("reparameterised for inference (timm)")
    return model, notes


def query_tokens(model, name: str) -> torch.Tensor:
    """One tokenised query: 12 tokens, the last the largest id (CLIP's end-of-text), padded with 0 to the context
    length the model's tokenizer pads to."""
    import open_clip

    length = open_clip.get_model_config(name)["text_cfg"].get("context_length", 77)
    vocab = getattr(model, "vocab_size", None) or model.text.vocab_size
    tokens = torch.zeros(1, length, dtype=torch.long)
    tokens[0, :QUERY_TOKENS] = torch.randint(1, vocab - 1, (QUERY_TOKENS,), generator=torch.Generator().manual_seed(0))
    tokens[0, QUERY_TOKENS - 1] = vocab - 1
    return tokens


@torch.inference_mode()
def measure(name: str, batch: int, batches: int) -> tuple[Speed, float]:
    """Speed of one model, and the seconds the measurement took."""
    from search.openclip.encoder import _can_trim_text, _encode_text_trimmed  # the path search queries take

    start = time.perf_counter()
    model, notes = build(name)
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    pixels = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))
    model.encode_image(pixels[:WARM_UP])  # warm-up: first-call allocations and kernel selection
    rates = []
    for _ in range(batches):
        tick = time.process_time()
        model.encode_image(pixels)
        rates.append(batch / (time.process_time() - tick))
    tokens = query_tokens(model, name)
    trim = _can_trim_text(model)

    def encode_text():
        features = _encode_text_trimmed(model, tokens) if trim else model.encode_text(tokens)
        return torch.nn.functional.normalize(features.float(), dim=-1)

    for _ in range(3):
        encode_text()
    latencies = []
    for _ in range(TEXT_REPEATS):
        tick = time.process_time()
        encode_text()
        latencies.append(time.process_time() - tick)
    if batch != BATCH:
        notes.append(f"images/s from {batches} batches of {batch} (a batch of {BATCH} takes minutes on one core)")
    speed = Speed(round(statistics.median(rates), 2), round(statistics.median(latencies) * 1000, 1), batch, batches,
                  "; ".join(notes))
    return speed, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated open_clip model names (default: every catalog model)")
    parser.add_argument("--batches", type=int, default=BATCHES, help=f"timed image batches (default: {BATCHES})")
    parser.add_argument("--no-write", action="store_true", help=f"print only; do not update {SPEEDS_FILE.name}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # open_clip warns on every random-weights model
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)

    names = args.models.split(",") if args.models else model_names()
    if BASELINE not in names:
        names.insert(0, BASELINE)
    measured: dict[str, Speed] = {}
    for name in names:
        batch, batches = SMALL_BATCHES.get(name, (BATCH, args.batches))
        try:
            speed, seconds = measure(name, batch, min(batches, args.batches))
        except Exception as exc:  # one model that cannot be built must not lose the others' numbers
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            speed, seconds = Speed(None, None, note=f"not measured: {first}"), 0.0
        measured[name] = speed
        print(f"{name}: {speed.images_per_s} images/s, {speed.text_ms} ms per query ({seconds:.0f} s) {speed.note}",
              flush=True)

    description = machine().removeprefix("machine: ")
    method = (f"fp32, torch {torch.__version__}, random weights, CPU time of {THREADS} thread (per core; stable "
              f"under other load); images/s = image tower forward only (no decoding or preprocessing), median of "
              f"{args.batches} batches of {BATCH}; text = one {QUERY_TOKENS}-token query as search runs it, median of "
              f"{TEXT_REPEATS}")
    base = measured[BASELINE]
    print(f"\n{description}\n{method}\n")
    print(f"| model | images/s | × {BASELINE} | text ms per query | × {BASELINE} |")
    print("|---|---|---|---|---|")
    for name, speed in measured.items():
        if speed.images_per_s is None or base.images_per_s is None:
            print(f"| {name} | – | – | – | – |")
            continue
        print(f"| {name} | {speed.images_per_s:.2f} | {speed.images_per_s / base.images_per_s:.2f} | "
              f"{speed.text_ms:.1f} | {speed.text_ms / base.text_ms:.2f} |")
    if args.no_write:
        return
    known = load_speeds().models  # a subset run keeps the other models' earlier numbers
    speeds = Speeds(description, datetime.date.today().isoformat(), method, {**known, **measured})
    SPEEDS_FILE.write_text(json.dumps(speeds.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nwrote {SPEEDS_FILE}")


if __name__ == "__main__":
    main()
