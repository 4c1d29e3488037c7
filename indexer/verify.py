"""`indexer info` and `indexer verify`: what an index holds, and whether its parts agree with each other and with
the model and files they came from."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from search.encoders import create_encoder
from search.errors import EngineError, ImageReadError
from search.images import load_image
from search.layout import KINDS
from search.store import StoredIndex, open_index

# re-encoding the same input with the same weights agrees to float rounding in fp32; lower precisions drift a little
REENCODE_MIN_COSINE = {"fp32": 0.999, "bf16": 0.99, "fp16": 0.99, "int8": 0.99}


@dataclass
class Verification:
    checks: list[str] = field(default_factory=list)  # "ok: ..." and "FAIL: ..." lines, in order
    failures: int = 0

    def check(self, passed: bool, ok: str, failed: str) -> bool:
        self.checks.append(f"ok: {ok}" if passed else f"FAIL: {failed}")
        self.failures += not passed
        return passed


def info(path: Path) -> dict:
    index = open_index(path)
    m = index.manifest
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return {"path": str(Path(path).resolve()), "format_version": m.format_version, "model": str(m.encoder),
            "fingerprint": m.fingerprint, "precision": m.precision, "runtime": m.runtime, "dim": m.dim, "metric": m.metric,
            "images": m.n_images, "captions": m.n_captions, "indexes": {kind: m.index_report(kind) for kind in KINDS},
            "source": m.source, "skipped": len(m.skipped), "created": m.created, "disk_bytes": size}


def _structure(index: StoredIndex, report: Verification) -> None:
    m = index.manifest
    image_ids, caption_rows = index.catalog.image_ids(), index.catalog.caption_links()
    report.check(image_ids == list(range(m.n_images)), f"catalog holds images 0..{m.n_images - 1}",
                 f"catalog holds {len(image_ids)} images with ids {image_ids[:3]}…, manifest says {m.n_images}")
    report.check([r[0] for r in caption_rows] == list(range(m.n_captions)),
                 f"catalog holds captions 0..{m.n_captions - 1}",
                 f"catalog holds {len(caption_rows)} captions, manifest says {m.n_captions}")
    orphans = sum(1 for _, image_id in caption_rows if not 0 <= image_id < m.n_images)
    report.check(orphans == 0, "every caption belongs to an indexed image", f"{orphans} captions point at no image")
    for kind, expected, faiss_index in (("images", m.n_images, index.images), ("captions", m.n_captions,
                                                                                 index.captions)):
        vectors = index.vectors(kind)
        on_disk = any(entry.get("on_disk") for entry in m.indexes.values())
        dtypes = (np.float32, np.float16) if on_disk else (np.float32,)  # see store.py
        if not report.check(vectors.shape == (expected, m.dim) and vectors.dtype in dtypes,
                            f"{kind} vectors: {expected} x {m.dim} {vectors.dtype}",
                            f"{kind} vectors are {vectors.shape} {vectors.dtype}, manifest says {expected} x {m.dim}"):
            continue
        norms = np.linalg.norm(np.asarray(vectors, np.float32), axis=1) if expected else np.ones(0)
        report.check(bool(np.all(np.isfinite(norms)) and np.allclose(norms, 1, atol=1e-3)),
                     f"{kind} vectors are finite and unit length", f"{kind} vectors are not all finite unit vectors")
        sample = np.random.default_rng(0).choice(expected, min(32, expected), replace=False) if expected else []
        if len(sample):
            found = faiss_index.search(np.asarray(vectors[np.sort(sample)], np.float32), 10)[1]
            missing = sum(i not in row for i, row in zip(np.sort(sample), found))
            report.check(missing == 0, f"{kind} FAISS index finds {len(sample)} sampled stored vectors",
                         f"{kind} FAISS index misses {missing} of {len(sample)} sampled stored vectors (ids or "
                         f"vectors out of step)")


def _against_model(index: StoredIndex, images_root: Path, sample_size: int, report: Verification) -> None:
    m = index.manifest
    encoder = create_encoder(m.encoder, precision=m.precision)
    if not report.check(encoder.fingerprint == m.fingerprint and encoder.dim == m.dim,
                        f"model {m.encoder} has the fingerprint the index was built with",
                        f"model {m.encoder} now has fingerprint {encoder.fingerprint}, the index was built with "
                        f"{m.fingerprint}"):
        return
    floor = REENCODE_MIN_COSINE.get(m.precision, 0.99)
    rng = np.random.default_rng(1)
    ids = sorted(rng.choice(m.n_images, min(sample_size, m.n_images), replace=False).tolist())
    records = index.catalog.images(ids)
    stored = index.vectors("images")
    cosines, unreadable = [], []
    for image_id in ids:
        try:
            image = load_image(images_root / records[image_id].path,
                               min_side=encoder.image_size if m.fast_decode else None)  # as the build decoded
        except ImageReadError as exc:
            unreadable.append(str(exc))
            continue
        cosines.append(float(encoder.encode_images([image])[0] @ stored[image_id]))
    report.check(not unreadable, f"{len(ids)} sampled image files are readable",
                 f"{len(unreadable)} sampled image files are unreadable (first: {unreadable[:1]})")
    if cosines:
        report.check(min(cosines) >= floor, f"re-encoded images match stored vectors (min cosine {min(cosines):.5f})",
                     f"re-encoded images differ from stored vectors (min cosine {min(cosines):.5f} < {floor})")
    if m.n_captions:
        caption_ids = sorted(rng.choice(m.n_captions, min(sample_size, m.n_captions), replace=False).tolist())
        texts = index.catalog.captions(caption_ids)
        encoded = encoder.encode_texts([texts[i].text for i in caption_ids])
        worst = float(np.min(np.sum(encoded * np.asarray(index.vectors("captions")[caption_ids]), axis=1)))
        report.check(worst >= floor, f"re-encoded captions match stored vectors (min cosine {worst:.5f})",
                     f"re-encoded captions differ from stored vectors (min cosine {worst:.5f} < {floor})")


def verify(path: Path, images_root: Path | None = None, sample_size: int = 8, use_model: bool = True) -> Verification:
    """Every check, in order; a failure does not stop the later independent checks."""
    report = Verification()
    try:
        index = open_index(path)  # manifest, files present, FAISS counts and dims against the manifest
    except EngineError as exc:
        report.check(False, "", str(exc))
        return report
    report.checks.append(f"ok: manifest and FAISS indexes agree ({index.manifest.n_images} images, "
                         f"{index.manifest.n_captions} captions, dim {index.manifest.dim})")
    _structure(index, report)
    if use_model and index.manifest.n_images:
        root = Path(images_root or index.manifest.source.get("images") or ".")
        try:
            _against_model(index, root, sample_size, report)
        except EngineError as exc:
            report.check(False, "", f"model check: {exc}")
    return report


def _size(n_bytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n_bytes < 1024 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "bytes" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return ""


def _index_line(entry: dict) -> str:
    """'IVF1024,Flat: nprobe 10, recall@10 0.991 against exact search, 12.3 MB' from a manifest's index report."""
    parts = [", ".join(f"{k} {v}" for k, v in (entry.get("params") or {}).items())]
    if entry.get("recall_at_10") is not None and entry.get("params"):
        parts.append(f"recall@10 {entry['recall_at_10']:.3f} against exact search")
    if entry.get("memory_bytes"):
        parts.append(_size(entry["memory_bytes"]) + " in memory")
    factory = entry.get("factory")
    details = "; ".join(p for p in parts if p)
    return f"{factory}{' (exact)' if factory == 'Flat' else ''}{': ' + details if details else ''}"


def format_info(details: dict) -> str:
    """`indexer info` as text a person reads: one labelled line per fact, sizes and counts formatted."""
    source = details.get("source") or {}
    where = ", ".join(f"{k} {v}" for k, v in source.items() if k != "format" and v not in (None, False, ""))
    rows = [("index", details["path"]),
            ("model", f"{details['model']}, weights {details['fingerprint']}, vectors encoded in "
                      f"{details['precision']} on {details['runtime']}"),
            ("vectors", f"{details['dim']}-d, {'inner product (cosine)' if details['metric'] == 'ip' else details['metric']}"),
            ("images", f"{details['images']:,}" + (f" ({details['skipped']} files skipped at build; see manifest.json)"
                                                    if details["skipped"] else "")),
            ("captions", f"{details['captions']:,}")]
    rows += [(f"{kind.rstrip('s')} index", _index_line(entry)) for kind, entry in details["indexes"].items()]
    rows += [("source", f"{source.get('format', '?')}{': ' + where if where else ''}"),
             ("created", details["created"] or "unknown"), ("size on disk", _size(details["disk_bytes"])),
             ("format", f"version {details['format_version']}")]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
