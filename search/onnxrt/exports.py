"""The export cache: $XDG_CACHE_HOME (default ~/.cache)/image-text-retrieval/onnx/<fingerprint>-<spec hash>/.

Each folder holds the towers of one model (image.onnx, text.onnx and, once asked for, their int8 variants), the
tokenizer's vocabulary and `encoder.json`: the spec, the weights fingerprint, the embedding width, the pixel recipe,
the tokenizer, and the identities of the weights files it was exported from. An export is valid while those files
are unchanged (same identity as the fingerprint cache uses: path, size, mtime, inode...), so a query process finds
its model by the spec and a few stat calls: no weights are read or hashed.

A model that cannot be exported (a tokenizer or transform the torch-free path does not reproduce exactly) is
remembered the same way with the reason, so `--runtime auto` goes straight to torch next time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..encoders import EncoderSpec
from ..errors import ModelLoadError
from ..fingerprints import app_cache_dir, file_identity
from . import DESCRIPTION_FILE, TOWERS, tower_file

log = logging.getLogger(__name__)

FORMAT = 2  # of encoder.json; a folder of another format is exported again (2: weights as external data)
EXPORTS_DIR = "onnx"


def exports_root() -> Path:
    return app_cache_dir() / EXPORTS_DIR


def spec_hash(spec: EncoderSpec) -> str:
    return hashlib.blake2b(json.dumps(spec.to_dict(), sort_keys=True).encode(), digest_size=4).hexdigest()


@dataclass(frozen=True)
class Export:
    """One export folder as its encoder.json describes it. `unsupported` is set (and the rest mostly empty) when the
    model could not be exported; `reason` then says why."""

    folder: Path
    spec: EncoderSpec
    sources: tuple = ()  # identities of the weights files (search.fingerprints.file_identity)
    fingerprint: str = ""
    dim: int = 0
    image_size: int | None = None
    pixels: dict = field(default_factory=dict)  # search.pixels.PixelRecipe.to_json()
    tokenizer: dict = field(default_factory=dict)  # {"kind": "clip_bpe", "vocab": file, "context_length": 77}
    text_trim: bool = False  # the text graph takes any length: padding after the longest text is cut off
    unsupported: str | None = None

    def to_json(self) -> dict:
        return {"format": FORMAT, "spec": self.spec.to_dict(), "sources": list(self.sources),
                "fingerprint": self.fingerprint, "dim": self.dim, "image_size": self.image_size,
                "pixels": self.pixels, "tokenizer": self.tokenizer, "text_trim": self.text_trim,
                "unsupported": self.unsupported}

    @classmethod
    def read(cls, folder: Path) -> "Export | None":
        """The export in `folder`, or None when it has no readable description of this format."""
        try:
            data = json.loads((folder / DESCRIPTION_FILE).read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                return None
            return cls(folder, EncoderSpec.from_dict(data["spec"]), tuple(tuple(s) for s in data["sources"]),
                       data["fingerprint"], int(data["dim"]), data.get("image_size"), data.get("pixels") or {},
                       data.get("tokenizer") or {}, bool(data.get("text_trim")), data.get("unsupported"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def write(self) -> None:
        (self.folder / DESCRIPTION_FILE).write_text(json.dumps(self.to_json(), indent=1), encoding="utf-8")

    def is_current(self) -> bool:
        """The weights files it was made from are still there, unchanged, and (when supported) its files exist."""
        if not self.sources or any(file_identity(s[0]) != list(s) for s in self.sources):
            return False
        return self.unsupported is not None or all((self.folder / tower_file(t, "fp32")).is_file() for t in TOWERS)

    def path(self, tower: str, precision: str = "fp32") -> Path:
        return self.folder / tower_file(tower, precision)


def folder_for(spec: EncoderSpec, fingerprint: str) -> Path:
    return exports_root() / f"{fingerprint}-{spec_hash(spec)}"


def find_export(spec: EncoderSpec) -> Export | None:
    """The current export (or remembered refusal) of `spec`, by a scan of the cache's small JSON files."""
    root = exports_root()
    try:
        folders = sorted(root.glob(f"*-{spec_hash(spec)}"), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return None
    for folder in folders:
        found = Export.read(folder)
        if found is not None and found.spec == spec and found.is_current():
            return found
    return None


def export_in_child(spec: EncoderSpec) -> Export:
    """Export `spec` in a child Python process (torch is imported there, not here); raises ModelLoadError."""
    command = [sys.executable, "-m", "search.openclip", "export", json.dumps(spec.to_dict())]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        reason = lines[-1][len("error: "):] if lines else (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise ModelLoadError(reason)
    found = find_export(spec)
    if found is None:
        raise ModelLoadError(f"exporting {spec} to ONNX left no usable export in {exports_root()}")
    return found


def ensure_export(spec: EncoderSpec) -> Export:
    """The export of `spec`, made now when missing (in this process when torch is already loaded, else in a child).
    Raises ModelLoadError when it cannot be made; a refusal that is remembered raises again without retrying."""
    found = find_export(spec)
    if found is None:
        log.info("exporting %s to ONNX Runtime (once; cached in %s)", spec, exports_root())
        if "torch" in sys.modules:
            from ..openclip.export import export_model  # torch is loaded anyway: no second process

            found = export_model(spec)
        else:
            found = export_in_child(spec)
    if found.unsupported:
        raise ModelLoadError(f"{spec} cannot run on ONNX Runtime: {found.unsupported}")
    return found
