"""Skywork-o1-Open-PRM adapter (e.g. Skywork/Skywork-o1-Open-PRM-Qwen-2.5-1.5B / -7B, from a
local folder), in-process only.

What the released checkpoints are (SkyworkAI/skywork-o1-prm-inference: model_utils/prm_model.py
and io_utils.py, as vendored by openreasoner/openr reason/llm_service/utils/skywork_o1_prm_inference/,
and the vLLM plugins that serve it, e.g. BooMinSeong/prm-toolkit prm_toolkit/skywork_prm_model.py):
- config `architectures: ["Qwen2ForPrmModel"]`, `model_type: qwen2`: a Qwen2 causal LM saved by
  a TRL-style value-head wrapper, so its tensors are the LM's (`model.*`, maybe `lm_head.weight`,
  unused here) plus the value head `v_head.summary.weight [1, H]` and `v_head.summary.bias [1]`
  (ValueHead: dropout, then Linear(hidden, 1) on the last hidden state; dropout is off at eval).
- input (prepare_input): token ids, not a text: `encode(bos_token + problem + "\\n")`, then per
  step `encode(step) + [id of "\\n"]` (each step encoded on its own; "\\n" is the step token, its
  id `encode("\\n")[-1]`). A step's reward is read at its last token, that "\\n".
- score: sigmoid(v_head output) at each step's end (derive_step_rewards with return_probs).
Here: the question and each step are stripped of surrounding whitespace (Skywork's steps are the
lines of a response, so they carry none); a newline inside a step is kept as text (the reward is
read only at each step's end); the Qwen2 tokenizer adds no special tokens, so ids are encoded
without them. The tokenizer must have a bos_token (the format starts with it).

Loading is native and strict (ets.prm.loading): a transformers Qwen2Model from `model.*`, the
head from `v_head.summary.*`; a missing, renamed or mis-shaped head is a CheckpointError naming
the keys. Not served: vLLM has no Qwen2ForPrmModel without a plugin, and ets.prm.served has no
Skywork convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ets.prm.base import PRMError
from ets.prm.math_shepherd import ModelPRM
from ets.prm.registry import BATCH_SIZE, BATCH_TOKENS, DEVICE, DTYPE, PRMKind, check_target, register

ARCH = "Qwen2ForPrmModel"
HEAD = ("v_head.summary.weight", "v_head.summary.bias")
STEP_TOKEN = "\n"


def load_skywork(path, dtype=None):
    """The Skywork PRM of a local folder, strictly loaded: forward(input_ids, attention_mask) ->
    values [B, T, 1] (logits: sigmoid gives P(step good))."""
    from torch import nn

    from ets.prm.loading import hidden_size, load_backbone_with_head

    summary = nn.Linear(hidden_size(path), 1)  # v_head.summary
    return load_backbone_with_head(path, summary, "v_head.summary.", ARCH, dtype, fix=(
        f"give a Skywork-o1-Open-PRM checkpoint ({ARCH}: backbone under model., head {', '.join(HEAD)})"))


class SkyworkPRM(ModelPRM):
    """Skywork-o1-Open-PRM: sigmoid of the value head at each step's closing "\\n" (module
    docstring). `model`: a loaded model (with `tokenizer`) or a local folder (tokenizer None)."""

    name = "skywork"

    def __init__(self, model, tokenizer=None, device=None, batch_size: int = 8, max_length: int | None = None,
                 dtype=None, batch_tokens: int | None = None):
        super().__init__(model, tokenizer, device, batch_size, max_length, dtype, batch_tokens)
        if not self.tok.bos_token:
            raise PRMError("Skywork's input starts with the tokenizer's bos_token, and this tokenizer has none")
        self.step_id = self.tok.encode(STEP_TOKEN, add_special_tokens=False)[-1]

    def from_folder(self, path: str | Path, dtype=None):
        from transformers import AutoTokenizer

        return load_skywork(path, dtype), AutoTokenizer.from_pretrained(str(path), local_files_only=True)

    def encode_path(self, question: str, step_texts: Sequence[str]) -> tuple[list[int], list[int]]:
        enc = lambda text: self.tok.encode(text, add_special_tokens=False)  # noqa: E731
        ids = enc(self.tok.bos_token + question.strip() + STEP_TOKEN)
        at = []
        for s in step_texts:
            ids += enc(s.strip()) + [self.step_id]
            at.append(len(ids) - 1)  # the step's closing "\n"
        return ids, at

    def _good_prob(self, input_ids, attention_mask):
        values = self.model(input_ids=input_ids, attention_mask=attention_mask)  # [B, T, 1]
        return values.squeeze(-1).float().sigmoid()  # [B, T]


register(PRMKind(
    "skywork", "\"{bos}{question}\\n\" then each step's own tokens and a \"\\n\": sigmoid of the value head "
    "(v_head.summary) at each step's \"\\n\" (Skywork-o1-Open-PRM)", ("path",),
    lambda spec, ctx: SkyworkPRM(spec.target, device=spec.get("device"), batch_size=spec.get("batch_size"),
                                 dtype=spec.get("dtype"), batch_tokens=spec.get("batch_tokens")),
    options=(DEVICE, DTYPE, BATCH_SIZE, BATCH_TOKENS), check=check_target,
    served_by="not served: stock vLLM has no Qwen2ForPrmModel (it would need a plugin); in-process only",
    tested="tiny random checkpoint in the released layout (model.* + v_head.summary): scores equal the "
           "value head applied by hand; a missing or renamed head fails naming the keys (tests/test_prm_kinds.py)"))
