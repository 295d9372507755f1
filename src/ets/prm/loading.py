"""Strict loading of in-process models: a checkpoint that does not fill every weight of the model
built for it is an error, never a silently random head.

transformers fills whatever a checkpoint lacks with fresh random weights and only logs it, so a
folder of the wrong architecture (a base LM given as a PRM, a PRM whose head has another name)
would score with noise. Every in-process load here goes through `strict_pretrained` (or, for a
head we build ourselves, `load_head`), which raises CheckpointError whenever a weight is missing
(newly initialised), unexpected, or of another shape; tied weights (lm_head = embeddings) are fine.

Imports torch: import it where a model is loaded, not at a kind's import.

Contract of CheckpointError: one line naming the folder, the offending keys (the first few of
each kind) and the fix. It is a SpecError (bad input), so the CLI reports it as `error: ...`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ets.prm.registry import SpecError

SHOW = 4  # keys named per kind in a message
# buffers some older checkpoints saved that every model recomputes (never weights)
HARMLESS = (".rotary_emb.inv_freq",)


class CheckpointError(SpecError):
    """A model folder whose tensors do not match the model built for it."""


def _few(keys) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - SHOW} more)" if len(keys) > SHOW else ""
    return ", ".join(keys[:SHOW]) + more


def mismatch_message(folder, arch: str, missing=(), unexpected=(), mismatched=(), errors=(), fix: str = "") -> str:
    """The one-line message of a checkpoint that does not fill `arch`; mismatched: (key, ckpt shape, model shape)."""
    parts = []
    if missing:
        parts.append(f"missing (would be random) {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected {_few(unexpected)}")
    if mismatched:
        parts.append("wrong shape " + ", ".join(f"{k} {tuple(a)} (model {tuple(b)})" for k, a, b in sorted(mismatched)[:SHOW]))
    if errors:
        parts.append(f"errors {'; '.join(str(e) for e in list(errors)[:2])}")
    fix = fix or f"give a folder holding a {arch} checkpoint, or the PRM kind that matches this one"
    return " ".join(f"{folder}: its weights do not fit {arch}: {'; '.join(parts)}. Fix: {fix}".split("\n"))


def _tied(model, missing: set[str]) -> set[str]:
    """The missing keys whose parameter is shared with a loaded one (tied weights)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(p) for k, p in params.items() if k not in missing}
    return {k for k in missing if k in params and id(params[k]) in loaded}


def strict_pretrained(cls, folder, arch: str | None = None, allow_unexpected=(), fix: str = "", **kw):
    """`cls.from_pretrained(folder, **kw)` (local files only) that raises CheckpointError unless every
    weight of the model comes from the checkpoint with its shape, and every checkpoint tensor is
    used, except the keys in `allow_unexpected` (loaded by the caller, e.g. a reward head)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would list the head we load ourselves as UNEXPECTED
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                          ignore_mismatched_sizes=True, **kw)  # mismatches reported, not raised
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = set(info.get("missing_keys") or ())
    missing -= _tied(model, missing)
    unexpected = {k for k in info.get("unexpected_keys") or () if k not in set(allow_unexpected)
                  and not k.endswith(HARMLESS)}
    mismatched = [(k, a, b) for k, a, b in info.get("mismatched_keys") or ()]
    errors = info.get("error_msgs") or ()
    if missing or unexpected or mismatched or errors:
        raise CheckpointError(mismatch_message(folder, arch or type(model).__name__, missing, unexpected,
                                               mismatched, errors, fix))
    return model


# -- reading a checkpoint's own tensors -----------------------------------------------------------

def hidden_size(folder) -> int:
    """config.json's hidden_size of a model folder (CheckpointError when it has none)."""
    cfg = Path(folder) / "config.json"
    try:
        size = json.loads(cfg.read_text(encoding="utf-8")).get("hidden_size")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: cannot read config.json ({e}). Fix: give a transformers model folder") from None
    if not isinstance(size, int) or size < 1:
        raise CheckpointError(f"{cfg}: no hidden_size. Fix: give a transformers model folder")
    return size


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{folder}: no model.safetensors (or its index); the reward head is read from "
                          "safetensors only. Fix: re-save the checkpoint with save_pretrained(safe_serialization=True)")


def checkpoint_shapes(folder) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the folder's safetensors checkpoint -> its shape (no tensor is read)."""
    from safetensors import safe_open

    out = {}
    for f in _safetensors_files(Path(folder)):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = tuple(st.get_slice(k).get_shape())
    return out


def read_tensors(folder, names) -> dict:
    """The named tensors of the folder's safetensors checkpoint (names absent there are left out)."""
    from safetensors import safe_open

    want, out = set(names), {}
    for f in _safetensors_files(Path(folder)):
        with safe_open(str(f), framework="pt") as st:
            for k in want.intersection(st.keys()):
                out[k] = st.get_tensor(k)
    return out


def load_head(module, folder, prefix: str, arch: str, body: str = "model.", ignore=("lm_head.weight",),
              fix: str = ""):
    """Fill `module` (a head we build, e.g. the PRM's `score` MLP) from the checkpoint's tensors
    named `prefix + its state_dict key`. CheckpointError when one is absent or of another shape,
    or when the checkpoint holds a tensor that is neither the backbone's (under `body`), the
    head's, nor in `ignore`: a renamed head is named, never skipped. Returns `module`."""
    shapes = checkpoint_shapes(folder)
    own = module.state_dict()
    names = {prefix + k: k for k in own}
    missing = [n for n in names if n not in shapes]
    unexpected = [n for n in shapes if not n.startswith(body) and n not in names and n not in ignore]
    mismatched = [(n, shapes[n], tuple(own[k].shape)) for n, k in names.items()
                  if n in shapes and shapes[n] != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise CheckpointError(mismatch_message(folder, arch, missing, unexpected, mismatched, fix=fix))
    tensors = read_tensors(folder, names)
    module.load_state_dict({k: tensors[n] for n, k in names.items()}, strict=True)
    return module


def load_backbone_with_head(folder, head, prefix: str, arch: str, dtype=None, fix: str = ""):
    """A Qwen2-backbone reward model of `folder`: `head` (an nn.Module on the last hidden state)
    filled from the tensors under `prefix` (load_head, checked first: it reads headers only), the
    backbone a transformers Qwen2Model from the folder's config and its `model.` tensors, both
    strict. Returns BackboneWithHead."""
    from transformers import Qwen2Model

    load_head(head, folder, prefix, arch, fix=fix)
    allow = {prefix + k for k in head.state_dict()} | {"lm_head.weight"}
    backbone = strict_pretrained(Qwen2Model, folder, arch=arch, allow_unexpected=allow, fix=fix, dtype=dtype or "auto")
    return BackboneWithHead(backbone, head.to(backbone.dtype))


class BackboneWithHead(torch.nn.Module):
    """A base model and a head on its last hidden state: forward(input_ids, attention_mask) ->
    head(h), h [B, T, H] (the head's output, e.g. [B, T, 2] logits or [B, T, 1] values)."""

    def __init__(self, backbone, head):
        super().__init__()
        self.model, self.head = backbone, head

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def forward(self, input_ids, attention_mask=None):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        return self.head(h)
