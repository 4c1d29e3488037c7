"""The recommended open_clip models behind `python -m search models`: what each one is, its published zero-shot
retrieval recall (every number from a named source, a cell left empty where the source gives none) and its CPU speed
measured on this machine with random weights (search/model_speeds.json, written by `python -m benchmarks.model_speed`).

Data and lookups only: imports nothing heavy, prints nothing. Recall is in %, as the sources' fractions × 100.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SPEEDS_FILE = Path(__file__).with_name("model_speeds.json")
LANGUAGES = ("en", "multilingual")  # "en": English only; "multilingual": also reads queries in other languages

# source key → where its numbers come from (cited in the table's legend and in --json)
SOURCES = {
    "open_clip": "open_clip docs/openclip_retrieval_results.csv (CLIP_benchmark; Flickr30k 1k and MS-COCO 5k "
                 "Karpathy test splits)",
    "mobileclip2": "apple/ml-mobileclip results/mobileclip2_s0.jsonl, mobileclip2_s4.jsonl (same benchmark suite)",
    "siglip2": "google-research/big_vision big_vision/configs/proj/image_text/README_siglip2.md (COCO R@1 only)",
    "open_clip-xm3600": "open_clip docs/openclip_multilingual_retrieval_results.csv (Crossmodal-3600: 3,600 images "
                        "captioned in 36 languages; recall averaged over the languages)",
}


@dataclass(frozen=True)
class Recall:
    """Published zero-shot recall on one dataset, in %: T→I = text→image, I→T = image→text; None = not published
    in the source."""
    t2i_r1: float | None
    i2t_r1: float | None
    t2i_r5: float | None = None
    i2t_r5: float | None = None


@dataclass(frozen=True)
class MultilingualRecall:
    """Crossmodal-3600 recall in %, averaged over its 36 languages, and text→image R@1 for Chinese queries alone."""
    t2i_r1: float
    t2i_r5: float
    i2t_r1: float
    t2i_r1_zh: float


@dataclass(frozen=True)
class CatalogModel:
    """One recommended model: the open_clip name and pretrained tag to pass, and what is known about it."""
    model: str
    pretrained: str
    family: str
    languages: str  # one of LANGUAGES
    dim: int  # embedding width (the index's vector size)
    image_size: int  # pixels per side the image tower takes
    source: str | None  # SOURCES key of flickr30k / coco
    flickr30k: Recall | None = None
    coco: Recall | None = None
    xm3600: MultilingualRecall | None = None
    xm3600_source: str | None = None
    note: str = ""

    @property
    def args(self) -> str:
        """The command-line arguments that select this model."""
        return f"--model {self.model} --pretrained {self.pretrained}"


def _r(t2i_r1: float, i2t_r1: float, t2i_r5: float | None = None, i2t_r5: float | None = None) -> Recall:
    return Recall(t2i_r1, i2t_r1, t2i_r5, i2t_r5)


CATALOG: tuple[CatalogModel, ...] = (
    CatalogModel("ViT-B-32", "laion2b_s34b_b79k", "CLIP", "en", 512, 224, "open_clip",
                 _r(66.78, 84.10, 88.38, 96.20), _r(39.34, 56.32, 65.43, 79.84), note="the default"),
    CatalogModel("ViT-B-32", "openai", "CLIP", "en", 512, 224, "open_clip",
                 _r(58.78, 78.90, 83.56, 94.90), _r(30.44, 50.12, 55.94, 75.00), note="OpenAI's original weights"),
    CatalogModel("MobileCLIP2-S0", "dfndr2b", "MobileCLIP2", "en", 512, 256, "mobileclip2",
                 _r(69.22, 86.60, 89.86, 97.20), _r(43.68, 62.68, 69.96, 83.92)),
    CatalogModel("MobileCLIP2-S4", "dfndr2b", "MobileCLIP2", "en", 768, 256, "mobileclip2",
                 _r(78.02, 92.40, 94.26, 98.70), _r(51.45, 69.34, 76.14, 87.80)),
    CatalogModel("EVA02-B-16", "merged2b_s8b_b131k", "EVA02-CLIP", "en", 512, 224, "open_clip",
                 _r(71.46, 86.00, 91.14, 96.60), _r(42.15, 58.74, 66.86, 80.56)),
    CatalogModel("ViT-B-16-SigLIP", "webli", "SigLIP", "en", 768, 224, "open_clip",
                 _r(74.68, 89.10, 92.30, 98.00), _r(47.78, 65.74, 72.44, 85.42)),
    CatalogModel("ViT-SO400M-14-SigLIP-384", "webli", "SigLIP", "en", 1152, 384, "open_clip",
                 _r(82.96, 94.30, 96.10, 99.70), _r(54.21, 72.42, 76.78, 89.98), note="best recall, slowest"),
    CatalogModel("ViT-B-16-SigLIP2", "webli", "SigLIP2", "multilingual", 768, 224, "siglip2",
                 coco=_r(52.1, 68.9), note="multilingual training data (Gemma tokenizer); no XM3600 figure here"),
    CatalogModel("ViT-B-32-SigLIP2-256", "webli", "SigLIP2", "multilingual", 768, 256, "siglip2",
                 coco=_r(47.2, 63.7), note="multilingual training data (Gemma tokenizer); no XM3600 figure here"),
    CatalogModel("xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k", "CLIP, XLM-R text tower", "multilingual", 512, 224,
                 "open_clip", _r(64.48, 82.70, 86.28, 96.40), _r(37.78, 53.54, 63.44, 77.98),
                 MultilingualRecall(42.56, 64.92, 45.86, 53.69), "open_clip-xm3600",
                 note="highest XM3600 Chinese text→image R@1 listed; weak on Bengali, Swahili, Telugu, Maori"),
    CatalogModel("nllb-clip-base-siglip", "v1", "NLLB-CLIP (SigLIP)", "multilingual", 768, 384, "open_clip",
                 _r(69.22, 79.20, 90.02, 95.00), _r(43.15, 51.16, 69.13, 77.76),
                 MultilingualRecall(50.67, 75.98, 46.70, 48.83), "open_clip-xm3600",
                 note="NLLB-200 text encoder: even across scripts (Bengali 48.4, Thai 52.8)"),
    CatalogModel("nllb-clip-base-siglip", "mrl", "NLLB-CLIP (SigLIP)", "multilingual", 768, 384, None,
                 xm3600=MultilingualRecall(55.39, 79.63, 52.32, 53.53), xm3600_source="open_clip-xm3600",
                 note="best multilingual recall here; no Flickr30k/COCO figure published"),
    CatalogModel("ViT-B-16-SigLIP-i18n-256", "webli", "SigLIP i18n", "multilingual", 768, 256, "open_clip",
                 _r(72.16, 89.60, 90.36, 98.20), _r(44.92, 64.48, 69.48, 84.34),
                 MultilingualRecall(44.07, 65.54, 48.94, 47.36), "open_clip-xm3600",
                 note="weak on Bengali, Thai, Telugu, Maori"),
)


@dataclass(frozen=True)
class Speed:
    """CPU speed of one architecture, measured here with random weights (same shapes, same cost as real ones)."""
    images_per_s: float | None  # image tower forward, batches of `image_batch`, median of `image_batches`
    text_ms: float | None  # one text query, median
    image_batch: int = 0
    image_batches: int = 0
    note: str = ""


@dataclass(frozen=True)
class Speeds:
    """The contents of model_speeds.json: where and how the speeds were measured, and one Speed per model name."""
    machine: str = ""
    date: str = ""
    method: str = ""
    models: dict[str, Speed] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"machine": self.machine, "date": self.date, "method": self.method,
                "models": {name: asdict(speed) for name, speed in self.models.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "Speeds":
        return cls(data.get("machine", ""), data.get("date", ""), data.get("method", ""),
                   {name: Speed(**speed) for name, speed in data.get("models", {}).items()})


def load_speeds(path: Path = SPEEDS_FILE) -> Speeds:
    """The measured speeds; empty (every model "not measured") when the file does not exist."""
    if not Path(path).is_file():
        return Speeds()
    return Speeds.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def models(language: str | None = None) -> list[CatalogModel]:
    """The catalog, or only the models that read queries in `language` ("en": all of them; "multilingual")."""
    if language not in (None, *LANGUAGES):
        raise ValueError(f"language must be one of {LANGUAGES}, not {language!r}")
    return [m for m in CATALOG if language in (None, "en") or m.languages == language]


def model_names() -> list[str]:
    """The distinct open_clip model names of the catalog, in catalog order (what the speed benchmark measures)."""
    return list(dict.fromkeys(m.model for m in CATALOG))


def to_json(entries: list[CatalogModel], speeds: Speeds) -> dict:
    """`python -m search models --json`: every row with its recall, sources, speed and arguments."""
    rows = []
    for m in entries:
        speed = speeds.models.get(m.model)
        rows.append({**asdict(m), "source_text": SOURCES.get(m.source) if m.source else None,
                     "xm3600_source_text": SOURCES.get(m.xm3600_source) if m.xm3600_source else None,
                     "speed": asdict(speed) if speed else None, "args": m.args})
    return {"speeds_measured": {"machine": speeds.machine, "date": speeds.date, "method": speeds.method},
            "sources": SOURCES, "models": rows}


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_rate(images_per_s: float | None) -> str:
    """Images/s as the table shows it: two significant digits below 1 (the huge models), else one decimal."""
    return _num(images_per_s, 2 if images_per_s is not None and images_per_s < 1 else 1)


def format_table(entries: list[CatalogModel], speeds: Speeds) -> str:
    """The table `python -m search models` prints: recall R@1 (T→I / I→T), speed here, and the arguments to pass."""
    header = ("model", "pretrained", "languages", "dim", "Flickr30k R@1", "COCO R@1", "XM3600 T→I R@1 (zh)", "source",
              "images/s (1 core)", "text ms", "pass")
    lines = []
    for m in entries:
        speed = speeds.models.get(m.model)
        flickr = f"{_num(m.flickr30k.t2i_r1)} / {_num(m.flickr30k.i2t_r1)}" if m.flickr30k else "–"
        coco = f"{_num(m.coco.t2i_r1)} / {_num(m.coco.i2t_r1)}" if m.coco else "–"
        xm = f"{_num(m.xm3600.t2i_r1)} ({_num(m.xm3600.t2i_r1_zh)})" if m.xm3600 else "–"
        source = ", ".join(s for s in (m.source, m.xm3600_source) if s)
        rate = format_rate(speed.images_per_s) if speed else "not measured"
        text = _num(speed.text_ms, 0) if speed else "–"
        lines.append((m.model, m.pretrained, m.languages, str(m.dim), flickr, coco, xm, source, rate, text, m.args))
    widths = [max(len(row[i]) for row in (header, *lines)) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (header, *lines)]
    out.append("")
    out.append("Recall: published zero-shot R@1 in %, text→image / image→text; XM3600: text→image R@1 averaged over "
               "its 36 languages (Chinese queries alone in brackets); – = not published in the source.")
    out.extend(f"  {key}: {text}" for key, text in SOURCES.items() if any(key in (m.source, m.xm3600_source)
                                                                          for m in entries))
    if speeds.machine:
        out.append(f"Speed: measured {speeds.date} on {speeds.machine}; {speeds.method}")
    else:
        out.append("Speed: not measured (run `python -m benchmarks.model_speed`)")
    notes = [f"  {m.model} ({m.pretrained}): {m.note}" for m in entries if m.note]
    notes += [f"  {name}: {speed.note}" for name, speed in speeds.models.items()
              if speed.note and any(m.model == name for m in entries)]
    if notes:
        out.append("Notes:")
        out.extend(notes)
    return "\n".join(out)
