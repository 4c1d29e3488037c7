"""The versioned `manifest.json` that makes an index directory self-describing.

It records the model identity (spec + weights fingerprint), the vector space (dim, metric), the FAISS factory
strings, counts, the source dataset and what was skipped. Readers check the format version before anything else.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .encoders import EncoderSpec
from .errors import IndexFormatError

FORMAT_VERSION = 2  # 2: the catalog records each image file's size, mtime and SHA-1
MANIFEST_NAME = "manifest.json"


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
    indexes: dict = field(default_factory=dict)  # per kind: factory, params (e.g. nprobe), tuned recall@10, bytes
    precision: str = "fp32"  # what the vectors were encoded with; queries may use another (cosine ~0.999 apart)
    fast_decode: bool = False  # JPEGs decoded at reduced scale (build --fast-decode); update and verify do the same
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["encoder"] = self.encoder.to_dict()
        data["skipped"] = list(self.skipped)
        return json.dumps(data, indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise IndexFormatError(
                f"index format version {version} is not supported (this program reads version {FORMAT_VERSION}); "
                f"rebuild the index")
        try:
            return cls(encoder=EncoderSpec.from_dict(data["encoder"]), fingerprint=data["fingerprint"],
                       dim=int(data["dim"]), n_images=int(data["n_images"]), n_captions=int(data["n_captions"]),
                       metric=data["metric"], image_factory=data["image_factory"],
                       caption_factory=data["caption_factory"], source=data.get("source", {}),
                       skipped=tuple(data.get("skipped", ())), created=data.get("created", ""),
                       precision=data.get("precision", "fp32"), indexes=data.get("indexes", {}),
                       fast_decode=bool(data.get("fast_decode", False)),
                       format_version=version)
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexFormatError(f"manifest is missing or has a bad field: {exc}") from None

    def write(self, directory: Path) -> None:
        (directory / MANIFEST_NAME).write_text(self.to_json(), encoding="utf-8")


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
