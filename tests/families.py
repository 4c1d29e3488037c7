"""Tiny models of every open_clip family, made offline: each is open_clip's own config for the family (named in
`Family.like`) shrunk to a few layers and a small width, its Hugging Face tokenizer (SigLIP's T5-style unigram,
SigLIP2's Gemma-style BPE, XLM-R's unigram) trained here with the `tokenizers` library on the test captions, and an
XLM-R text tower built from a tiny transformers config (no download). `make_family_dir` saves one as a local-dir
folder with search.openclip.local_dir.init_local_dir, which copies the tokenizer and HF config into it."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from .helpers import BACKGROUNDS, COLOURS, SHAPES

CORPUS = [f"a {colour} {shape} on a {background} background" for colour in COLOURS for shape in SHAPES
          for background in BACKGROUNDS] + [f"the {shape} is {colour}" for shape in SHAPES for colour in COLOURS]
CONTEXT = 16  # tokens per text of the HF-tokenizer families

# timm towers, the smallest of each kind timm registers (open_clip passes timm no size: these take any input size
# except EVA02, which takes 224 px only)
SIGLIP_VISION = {"image_size": 32, "timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "map",
                 "timm_proj": "none"}  # ViT-B-16-SigLIP: a timm ViT pooled by attention (MAP), no projection
SIGLIP_TEXT = {"context_length": CONTEXT, "width": 64, "heads": 2, "layers": 2,
               "tokenizer_kwargs": {"clean": "canonicalize"}, "no_causal_mask": True, "proj_bias": True,
               "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}  # SigLIP's text tower: no causal mask, last token
CLIP_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
SMALL_VIT = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32}


@dataclass(frozen=True)
class Family:
    like: str  # the open_clip config it is shrunk from
    model_cfg: dict
    tokenizer: str | None = None  # "t5", "gemma" or "xlmr": an HF tokenizer built here; None: CLIP's BPE
    hf_text: dict = field(default_factory=dict)  # transformers XLMRobertaConfig arguments of an HF text tower


FAMILIES = {
    "siglip": Family("ViT-B-16-SigLIP", {
        "embed_dim": 64, "init_logit_bias": -10, "custom_text": True, "vision_cfg": SIGLIP_VISION,
        "text_cfg": SIGLIP_TEXT}, "t5"),
    "siglip2": Family("ViT-B-16-SigLIP2", {
        "embed_dim": 64, "init_logit_bias": -10, "custom_text": True, "vision_cfg": SIGLIP_VISION,
        "text_cfg": {**SIGLIP_TEXT, "act_kwargs": {"approximate": "tanh"}}}, "gemma"),
    "mobileclip2": Family("MobileCLIP2-S0", {
        "embed_dim": 32, "custom_text": True,
        "vision_cfg": {"timm_model_name": "fastvit_mci0", "timm_model_pretrained": False, "timm_pool": "avg",
                       "timm_proj": None, "timm_drop": 0.0, "timm_drop_path": 0.0, "image_size": 32},
        "text_cfg": {**CLIP_TEXT, "no_causal_mask": True}}),
    "eva": Family("EVA02-B-16", {
        "embed_dim": 32, "custom_text": True,
        "vision_cfg": {"image_size": 224, "timm_model_name": "eva02_tiny_patch14_224", "timm_model_pretrained": False,
                       "timm_pool": "token", "timm_proj": None},
        "text_cfg": CLIP_TEXT}),
    "coca": Family("coca_ViT-B-32", {
        "embed_dim": 32, "custom_text": True,
        "vision_cfg": {**SMALL_VIT, "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
        "text_cfg": {**CLIP_TEXT, "context_length": 76, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {**CLIP_TEXT, "context_length": 76, "layers": 1, "attn_pooler_heads": 2}}),
    "xlmr": Family("xlm-roberta-base-ViT-B-32", {
        "embed_dim": 32, "vision_cfg": SMALL_VIT,
        "text_cfg": {"context_length": CONTEXT, "hf_pooler_type": "mean_pooler"}}, "xlmr",
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
         "max_position_embeddings": CONTEXT + 2, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}),
}
HF_TOKENIZER_FAMILIES = ("siglip", "siglip2", "xlmr")
SIGLIP_FAMILIES = ("siglip", "siglip2")  # a learnt logit bias: fine-tuned with the sigmoid loss


def build_tokenizer(kind: str, folder: Path) -> int:
    """Train a tiny tokenizer of `kind` on CORPUS into `folder` (tokenizer.json + tokenizer_config.json, what
    transformers' AutoTokenizer reads); returns its vocabulary size. Special tokens at the ids the real ones have."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "gemma":  # SigLIP2: Gemma's BPE, <pad>=0 <eos>=1 <bos>=2; texts end with <eos>
        specials = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials.values()), show_progress=False)
        template = "$A <eos>"
    elif kind == "t5":  # SigLIP: T5's unigram, <pad>=0 </s>=1; texts end with </s>
        specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.NFKC()
        trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=list(specials.values()), unk_token="<unk>",
                                          show_progress=False)
        template = "$A </s>"
    else:  # XLM-R's unigram: <s>=0 <pad>=1 </s>=2, texts as <s> ... </s>
        specials = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
        tokenizer = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=list(specials.values()), unk_token="<unk>",
                                          show_progress=False)
        template = "<s> $A </s>"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(CORPUS, trainer)
    ends = [(token, tokenizer.token_to_id(token)) for token in ("<s>", "</s>", "<eos>") if token in template]
    tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=ends)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": CONTEXT, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return tokenizer.get_vocab_size()


def family_config(name: str, source: Path) -> dict:
    """The family's open_clip model config; its tokenizer (and HF text config) are written into `source`, which the
    config names the way a real one names a hub repository."""
    family = FAMILIES[name]
    model_cfg = copy.deepcopy(family.model_cfg)
    text_cfg = model_cfg["text_cfg"]
    if family.tokenizer:
        vocab = build_tokenizer(family.tokenizer, source)
        text_cfg["hf_tokenizer_name"] = str(source)
        if family.hf_text:
            from transformers import XLMRobertaConfig

            XLMRobertaConfig(vocab_size=vocab, **family.hf_text).save_pretrained(str(source))
            text_cfg["hf_model_name"] = str(source)
        else:
            text_cfg["vocab_size"] = vocab
    return model_cfg


def make_family_dir(name: str, root: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny model of family `name` as the local-dir folder root/name (its tokenizer and HF
    config sources in root/name-source)."""
    from search.openclip.local_dir import init_local_dir

    return init_local_dir(family_config(name, Path(root) / f"{name}-source"), Path(root) / name, seed)
