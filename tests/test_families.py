"""Every open_clip family (SigLIP, SigLIP2, MobileCLIP2, EVA, CoCa, an XLM-R text tower), as tiny models saved as
local-dir folders (tests/families.py) and loaded like real weights: vectors against open_clip's own, index build,
query, eval and one fine-tuning step, runtimes. Oracle: open_clip's create_model_and_transforms + preprocess +
encode_image/encode_text on the same folder, and tests.helpers.reference_recall on its vectors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import indexer
from indexer import finetune
from indexer.cli import main as indexer_main
from indexer.readers import read_dataset
from search.cli import main as search_main
from search.encoders import EncoderSpec, create_encoder
from search.errors import ModelLoadError
from search.openclip import WEIGHTS_FILE
from search.openclip.local_dir import save_local_dir
from search.openclip.training import ClipTask
from search.store import open_index

from .families import FAMILIES, HF_TOKENIZER_FAMILIES, SIGLIP_FAMILIES, make_family_dir
from .helpers import make_pairs, reference_recall, write_flickr8k, write_images

ROOT = Path(__file__).resolve().parents[1]
PAIRS = make_pairs(8, seed=5)
MIN_COSINE = 0.9999
TEXTS = sorted({c for p in PAIRS for c in p[1]}) + ["", "word " * 40]  # empty and longer than any context


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    write_images(root / "images", PAIRS)
    return root, write_flickr8k(root / "text", PAIRS, ["train"] * len(PAIRS))


@pytest.fixture(scope="module")
def models(tmp_path_factory, data):
    """Family name → (local-dir folder, its torch encoder, open_clip's vectors of every test image and caption by
    path and by text), made on first use."""
    root, made = tmp_path_factory.mktemp("family_models"), {}
    paths = [data[0] / "images" / p[0] for p in PAIRS]

    def family(name: str) -> tuple[Path, object, dict, dict]:
        if name not in made:
            folder = make_family_dir(name, root)
            images, captions = oracle(folder, paths, TEXTS)
            made[name] = (folder, create_encoder(spec_of(folder), "torch"), dict(zip(map(str, paths), images)),
                          dict(zip(TEXTS, captions)))
        return made[name]
    return family


def spec_of(folder: Path) -> EncoderSpec:
    return EncoderSpec.from_args(f"local-dir:{folder}", None)


def oracle(folder: Path, image_paths, texts) -> tuple[np.ndarray, np.ndarray]:
    """open_clip alone on the folder: normalised image and text vectors."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in image_paths])
        images, captions = model.encode_image(pixels), model.encode_text(tokenizer(list(texts)))
    return (torch.nn.functional.normalize(images, dim=-1).numpy(),
            torch.nn.functional.normalize(captions, dim=-1).numpy())


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum(axis=1).min())


@pytest.mark.parametrize("name", FAMILIES)
def test_loads_like_open_clip(models, data, name):
    folder, encoder, images, captions = models(name)
    paths = [data[0] / "images" / p[0] for p in PAIRS]
    got = encoder.encode_images([Image.open(p).convert("RGB") for p in paths])
    assert min_cosine(got, np.stack([images[str(p)] for p in paths])) >= MIN_COSINE
    assert min_cosine(encoder.encode_texts(TEXTS), np.stack([captions[t] for t in TEXTS])) >= MIN_COSINE
    assert not encoder.trim_text  # padding is cut only for CLIP's own causal tower, pooled at its end token
    hf_tokenizer = type(encoder.tokenizer).__name__ == "HFTokenizer"
    assert hf_tokenizer == (name in HF_TOKENIZER_FAMILIES)
    if hf_tokenizer:  # copied into the folder, it gives the ids of the tokenizer the config named
        source = open_clip.tokenizer.HFTokenizer(str(folder.parent / f"{name}-source"), context_length=16,
                                                 clean="canonicalize" if "siglip" in name else "whitespace")
        assert torch.equal(encoder.tokenize(TEXTS), source(TEXTS))
    loss = ClipTask(encoder, None).contrastive_loss()
    assert type(loss).__name__ == ("SigLipLoss" if name in SIGLIP_FAMILIES else "ClipLoss")
    assert encoder.reparameterized == (name == "mobileclip2")


def test_mobileclip2_is_reparameterised_for_inference_with_equal_vectors(models):
    folder, encoder, _, _ = models("mobileclip2")
    task = ClipTask.load(spec_of(folder))
    trainable, fused = task.encoder.model.eval(), encoder.model
    assert not task.encoder.reparameterized  # training keeps the train-time branches
    assert sum(1 for _ in fused.parameters()) < sum(1 for _ in trainable.parameters())  # branches fused away
    pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(fused.encode_image(pixels), trainable.encode_image(pixels), rtol=1e-4, atol=1e-5)
    assert encoder.fingerprint == task.encoder.fingerprint  # of the weights as saved
    with pytest.raises(ModelLoadError, match="reparameterised"):
        save_local_dir(encoder, folder.parent / "not-saved")


def weight_names(folder: Path) -> set[str]:
    with safe_open(str(folder / WEIGHTS_FILE), "pt") as weights:
        return set(weights.keys())


def logit_bias(folder: Path) -> float:
    with safe_open(str(folder / WEIGHTS_FILE), "pt") as weights:
        return float(weights.get_tensor("logit_bias"))


# timm's smallest EVA02 takes 224 px only and FastViT initialises slowly: their end-to-end runs take ~20 s each
END_TO_END = [pytest.param(name, marks=pytest.mark.slow) if name in ("eva", "mobileclip2") else name
              for name in FAMILIES]


@pytest.mark.parametrize("name", END_TO_END)
def test_build_query_eval_and_one_finetuning_step(models, data, tmp_path, capsys, name):
    root, token = data
    folder, original, image_vectors, text_vectors = models(name)
    indexer.build("flickr8k", root / "images", tmp_path / "index", annotations=token, split="train",
                  model=f"local-dir:{folder}", runtime="torch")
    index = open_index(tmp_path / "index")
    paths = [root / "images" / record.path for record in index.catalog.all_images()]
    captions = index.catalog.captions(range(index.manifest.n_captions))
    texts = [captions[i].text for i in range(len(captions))]
    images = np.stack([image_vectors[str(p)] for p in paths])
    caption_vectors = np.stack([text_vectors[t] for t in texts])
    assert min_cosine(np.asarray(index.image_vectors), images) >= MIN_COSINE
    assert min_cosine(np.asarray(index.caption_vectors), caption_vectors) >= MIN_COSINE

    query = PAIRS[3][1][0]
    assert search_main(["query", "--index", str(tmp_path / "index"), "--text", query, "-k", "3", "--json",
                        "--runtime", "torch"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    expected = images @ text_vectors[query]
    order = np.argsort(-expected)[:3]
    assert [r["image"] for r in results] == [paths[i].name for i in order]
    assert [r["score"] for r in results] == pytest.approx(expected[order].tolist(), abs=1e-4)

    assert search_main(["eval", "--index", str(tmp_path / "index"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for k in (1, 5):
        t2i, i2t = reference_recall(images, caption_vectors, index.catalog.caption_image_ids(), k)
        assert (metrics["text_to_image"][f"R@{k}"], metrics["image_to_text"][f"R@{k}"]) == pytest.approx((t2i, i2t))

    out = tmp_path / "tuned"  # one step of 4 pairs
    assert indexer_main(["finetune", "--format", "flickr8k", "--annotations", str(token), "--images",
                         str(root / "images"), "--split", "train", "--model", f"local-dir:{folder}", "--out", str(out),
                         "--epochs", "1", "--max-steps", "1", "--batch-size", "4", "--lr", "1e-3", "--workers", "0",
                         "--quiet"]) == 0
    tuned = create_encoder(spec_of(out), "torch")
    sample = [Image.open(p).convert("RGB") for p in paths[:4]]
    assert np.abs(tuned.encode_images(sample) - original.encode_images(sample)).max() > 1e-3
    assert np.abs(tuned.encode_texts(texts[:4]) - original.encode_texts(texts[:4])).max() > 1e-3
    assert weight_names(out) == weight_names(folder)  # the trainable weights (MobileCLIP2: not the fused ones)
    if name in HF_TOKENIZER_FAMILIES:
        assert (out / "tokenizer.json").is_file() and torch.equal(tuned.tokenize(texts), original.tokenize(texts))
    if name in SIGLIP_FAMILIES:  # the sigmoid loss trains the bias; CLIP's loss would leave it at its -10
        assert logit_bias(out) != logit_bias(folder)


def test_siglip_accumulated_steps_match_one_big_batch(models, data, tmp_path):
    """Cached features with SigLIP's loss: 4 micro-batches give the full batch's gradient, bias included."""
    root, token = data
    samples = read_dataset("flickr8k", token, root / "images", "train")
    task = ClipTask.load(spec_of(models("siglip")[0]))
    initial = {name: value.clone() for name, value in task.state_dict().items()}
    grads = {}
    for accum in (1, 4):
        task.load_state_dict(initial)
        config = finetune.FinetuneConfig(epochs=1, batch_size=8, accum_steps=accum, lr=1e-3, workers=0,
                                         progress=False)
        trainer = finetune.Trainer(task, samples, None, root / "images", tmp_path / f"out{accum}", config, {}, False)
        torch.manual_seed(0)
        trainer.step(*trainer.dataset.collate([trainer.dataset[i] for i in range(8)]))
        grads[accum] = {n: p.grad.clone() for n, p in task.encoder.model.named_parameters() if p.grad is not None}
    assert grads[1].keys() == grads[4].keys() and {"logit_scale", "logit_bias"} <= grads[1].keys()
    for name in grads[1]:
        torch.testing.assert_close(grads[4][name], grads[1][name], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", HF_TOKENIZER_FAMILIES)
def test_auto_runs_hf_tokenizer_models_on_torch_and_onnx_says_why_not(models, name):
    spec = spec_of(models(name)[0])
    assert create_encoder(spec, "auto").runtime == "torch"
    with pytest.raises(ModelLoadError) as refused:
        create_encoder(spec, "onnx")
    assert "cannot run on ONNX Runtime" in str(refused.value) and "\n" not in str(refused.value)


def test_a_model_the_exporter_fails_on_runs_on_torch_and_the_failure_is_remembered(tmp_path, monkeypatch):
    from search.openclip import export

    def failing(*args, **kwargs):
        raise RuntimeError("cannot trace this\nmore detail")

    monkeypatch.setattr(export, "_export", failing)
    spec = spec_of(make_family_dir("coca", tmp_path))  # a model of its own: the refusal stays in the cache
    assert create_encoder(spec, "auto").runtime == "torch"
    monkeypatch.undo()  # remembered: not exported again while the weights are unchanged
    with pytest.raises(ModelLoadError, match="^[^\n]*exporter failed: cannot trace this$"):
        create_encoder(spec, "onnx")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobileclip2", "eva", "coca"])
def test_auto_exports_the_other_families_to_onnx(models, data, name):
    folder, torch_encoder, _, _ = models(name)
    paths = [data[0] / "images" / p[0] for p in PAIRS]
    texts = [p[1][0] for p in PAIRS]
    onnx = create_encoder(spec_of(folder), "auto")
    assert onnx.runtime == "onnx" and onnx.fingerprint == torch_encoder.fingerprint
    sample = [Image.open(p).convert("RGB") for p in paths]
    assert min_cosine(onnx.encode_images(sample), torch_encoder.encode_images(sample)) >= MIN_COSINE
    assert min_cosine(onnx.encode_texts(texts), torch_encoder.encode_texts(texts)) >= MIN_COSINE


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_hf_text_tower_through_the_cli_offline(data, tmp_path):
    """The way a user runs it: `python -m` from another directory, relative paths, no network, the folder on its own
    (the tokenizer and HF config it was made from deleted)."""
    root, token = data
    work = tmp_path / "work"
    shutil.copytree(root, work)
    make_family_dir("xlmr", work)
    shutil.rmtree(work / "xlmr-source")
    ann = str(Path("text") / token.name)
    built = run(["-m", "indexer", "build", "--format", "flickr8k", "--annotations", ann, "--images", "images",
                 "--out", "index", "--model", "local-dir:xlmr", "--quiet"], work)
    assert built.returncode == 0 and built.stderr == "", built.stderr  # auto → torch, silently
    found = run(["-m", "search", "query", "--index", "index", "--text", PAIRS[0][1][0], "-k", "2", "--json"], work)
    assert found.returncode == 0, found.stderr
    encoder = create_encoder(spec_of(work / "xlmr"), "torch")  # the same folder in this process
    scores = encoder.encode_images([Image.open(work / "images" / p[0]).convert("RGB") for p in PAIRS]) @ \
        encoder.encode_texts([PAIRS[0][1][0]])[0]
    results = json.loads(found.stdout)["results"]
    assert [r["image"] for r in results] == [PAIRS[i][0] for i in np.argsort(-scores)[:2]]
    assert [r["score"] for r in results] == pytest.approx(np.sort(scores)[::-1][:2].tolist(), abs=1e-4)
    evaluated = run(["-m", "search", "eval", "--index", "index", "--json"], work)
    assert evaluated.returncode == 0 and "R@1" in json.loads(evaluated.stdout)["text_to_image"], evaluated.stderr
    refused = run(["-m", "search", "query", "--index", "index", "--text", "x", "--runtime", "onnx"], work)
    assert refused.returncode == 1 and refused.stderr.startswith("error: ") and refused.stderr.count("\n") == 1
    tuned = run(["-m", "indexer", "finetune", "--format", "flickr8k", "--annotations", ann, "--images", "images",
                 "--split", "train", "--model", "local-dir:xlmr", "--out", "tuned", "--epochs", "1",
                 "--batch-size", "8", "--workers", "0", "--quiet"], work)
    assert tuned.returncode == 0, tuned.stderr
    for name in ("config.json", "tokenizer.json", WEIGHTS_FILE):
        assert (work / "tuned" / name).is_file()
    tuned_vectors = create_encoder(spec_of(work / "tuned"), "torch").encode_texts(["a red circle"])
    assert np.abs(tuned_vectors - encoder.encode_texts(["a red circle"])).max() > 1e-4
