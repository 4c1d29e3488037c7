"""The open_clip encoder family: the only package of the project that imports open_clip.

    loading.py    spec checks, offline hub handling, precision, building a model; the fingerprint cache glue
    encoder.py    `OpenClipEncoder`, the inference `Encoder`
    training.py   `ClipTask`, all that fine-tuning does to a model (features, loss, locking, state, saving)
    local_dir.py  open_clip local-dir folders (config + weights): writing one, a random initialisation

This module itself imports nothing heavy: command-line code reads the file names below before it loads torch.
"""

CONFIG_FILE = "open_clip_config.json"  # a local-dir folder's model (and preprocessing) config, as open_clip names it
WEIGHTS_FILE = "open_clip_model.safetensors"  # the weights file this project writes into a local-dir folder
HF_CONFIG_FILE = "config.json"  # a local-dir's Hugging Face text tower config (transformers' file name)
HF_CONFIG_KEY = "hf_text_config"  # CONFIG_FILE's key naming that file (open_clip ignores keys it does not know)
RUN_FILE = "training.json"  # a fine-tuned model folder's run record: settings, per-epoch history (indexer finetune)
