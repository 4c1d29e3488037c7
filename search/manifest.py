"""The versioned `manifest.json` that makes an index directory self-describing.

It records the model identity (spec + weights fingerprint), the vector space (dim, metric), the FAISS factory
strings, counts, the source dataset and what was skipped. Readers check the format version before anything else.

Each FAISS factory string is stored once, as `image_factory` / `caption_factory`; `indexes` holds what else the build
chose per kind (params, tuned recall@10, bytes). Manifests written before this rule also repeat the factory inside
`indexes`: the reader drops that copy (same format version, since both forms read the same).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import write_atomic
from .encoders import EncoderSpec
from .errors import IndexFormatError
from .layout import MANIFEST_NAME

FORMAT_VERSION = 3  # 2: the catalog records each image file's size, mtime and SHA-1; 3: date, split, keyword index
READABLE_VERSIONS = (2, 3)  # a version-2 index answers plain searches; `python -m indexer migrate` upgrades it


@dataclass(frozen=True)
class Manifest:
    encoder: EncoderSpec
    fingerprint: str
    dim: int
    n_images: int
    n_captions: int
    metric: str = "ip"
    image_factory: str = "Flat"
    caption_factory: str = "Flat"
    source: dict = field(default_factory=dict)  # format, annotations, images root, split
    skipped: tuple = ()  # ({"path": .., "reason": ..}, ...)
    created: str = ""
    indexes: dict = field(default_factory=dict)  # per kind: params (e.g. nprobe), tuned recall@10, bytes
    precision: str = "fp32"  # what the vectors were encoded with; queries may use another (cosine ~0.999 apart)
    runtime: str = "torch"  # what encoded the vectors: torch or onnx (equal to ~1e-6; informational)
    fast_decode: bool = False  # JPEGs decoded at reduced scale (build --fast-decode); update and verify do the same
    relevance: dict = field(default_factory=dict)  # score → relevance maps per query kind (search/relevance.py)
    near_duplicates: dict = field(default_factory=dict)  # calibrated duplicate thresholds per tier (search/dedupe.py)
    format_version: int = FORMAT_VERSION

    def factory(self, kind: str) -> str:
        """The FAISS factory string of the 'images' or 'captions' index."""
        return self.image_factory if kind == "images" else self.caption_factory

    def index_report(self, kind: str) -> dict:
        """What the build chose for the index of `kind`: factory, then params, tuned recall@10, bytes when recorded."""
        return {"factory": self.factory(kind), **self.indexes.get(kind, {})}

    def to_json(self) -> str:
        data = asdict(self)
        data["encoder"] = self.encoder.to_dict()
        data["skipped"] = list(self.skipped)
        return json.dumps(data, indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise IndexFormatError(
                f"index format version {version} is not supported (this program reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}); rebuild the index")
        try:
            return cls(encoder=EncoderSpec.from_dict(data["encoder"]), fingerprint=data["fingerprint"],
                       dim=int(data["dim"]), n_images=int(data["n_images"]), n_captions=int(data["n_captions"]),
                       metric=data["metric"], image_factory=data["image_factory"],
                       caption_factory=data["caption_factory"], source=data.get("source", {}),
                       skipped=tuple(data.get("skipped", ())), created=data.get("created", ""),
                       precision=data.get("precision", "fp32"), indexes=_without_factories(data.get("indexes", {})),
                       fast_decode=bool(data.get("fast_decode", False)), runtime=data.get("runtime", "torch"),
                       relevance=data.get("relevance", {}), near_duplicates=data.get("near_duplicates", {}),
                       format_version=version)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise IndexFormatError(f"manifest is missing or has a bad field: {exc}") from None

    def write(self, directory: Path) -> None:
        write_atomic(Path(directory) / MANIFEST_NAME, self.to_json())


def _without_factories(indexes: dict) -> dict:
    """`indexes` without the copies of the factory strings that earlier manifests kept there."""
    return {kind: {k: v for k, v in entry.items() if k != "factory"} for kind, entry in indexes.items()}


def read_manifest(directory: Path) -> Manifest:
    directory = Path(directory)
    if not directory.is_dir():
        raise IndexFormatError(f"{directory}: no such index directory")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise IndexFormatError(f"{directory} is not an index: no {MANIFEST_NAME} (build one with python -m indexer build)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict):
        raise IndexFormatError(f"{path}: unreadable manifest (not a JSON object)")
    return Manifest.from_dict(data)
