"""Qwen2.5-Math-PRM-style adapter: "<extra_0>" after each step, a reward head giving two-class
logits per token; the step score is softmax(logits)[..., 1] at each separator position.

Input (as in the model card): chat template with the system prompt below, the question as the
user turn, and the assistant turn "step1<extra_0>step2<extra_0>..." (question and steps
stripped, a tag inside a step removed: ets.prm.formats.tagged_steps). Without a chat template
the same ChatML text is written out, exactly as the served PRM sends it (ets.prm.served).

Loading, natively (no remote code), from the released checkpoint's layout, which vLLM's
Qwen2ForProcessRewardModel (vllm/model_executor/models/qwen2_rm.py) and the card's
modeling_qwen2_rm.py both read: config `architectures: ["Qwen2ForProcessRewardModel"]`,
`model_type: qwen2`; the backbone's tensors under `model.` (a transformers Qwen2Model, built
from the folder's config); the head `score` = Linear(hidden, hidden) -> ReLU -> Linear(hidden, 2),
tensors `score.0.weight [H, H]`, `score.0.bias [H]`, `score.2.weight [2, H]`, `score.2.bias [2]`;
an `lm_head.weight` is ignored (vLLM ignores it too). vLLM's default step tag id is 151651,
`<extra_0>` in the released tokenizer. A folder holding a 2-label Qwen2ForTokenClassification
(head `score.weight [2, H]`, `score.bias [2]`) loads too. Every load is strict
(ets.prm.loading): a head that is missing, renamed or of another shape is a CheckpointError
naming the keys, never a random head.
"""

from __future__ import annotations

from pathlib import Path

from ets.prm.formats import tagged_steps
from ets.prm.math_shepherd import StepTagPRM, served_or_local
from ets.prm.registry import (BATCH_SIZE, BATCH_TOKENS, DEVICE, DTYPE, MODEL, SYSTEM as SYSTEM_OPTION,
                              TRUST_REMOTE_CODE, PRMKind, SpecError, check_target, register)

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
ARCH = "Qwen2ForProcessRewardModel"
HEAD = ("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias")


def load_qwen_prm(path, dtype=None, trust_remote_code: bool = False):
    """The PRM model of a local folder (see the module docstring), strictly loaded: a module whose
    forward(input_ids, attention_mask) gives [B, T, 2] logits (or an output with `.logits`)."""
    from torch import nn
    from transformers import AutoModel, AutoModelForTokenClassification

    from ets.prm.loading import (CheckpointError, checkpoint_shapes, hidden_size, load_backbone_with_head,
                                  strict_pretrained)

    if trust_remote_code:  # the checkpoint's own modeling code (still strictly checked)
        return strict_pretrained(AutoModel, path, trust_remote_code=True, dtype=dtype or "auto")
    shapes = checkpoint_shapes(path)
    if "score.weight" in shapes and not any(k in shapes for k in HEAD):  # a token-classification folder
        model = strict_pretrained(AutoModelForTokenClassification, path, dtype=dtype or "auto")
        if model.config.num_labels != 2:
            raise CheckpointError(f"{path}: its head has {model.config.num_labels} labels; a Qwen-style PRM has 2 "
                                  "(P(step good) = softmax(logits)[1]). Fix: give a 2-label checkpoint")
        return model
    H = hidden_size(path)
    score = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 2))  # score.0, score.1 (no tensors), score.2
    return load_backbone_with_head(path, score, "score.", ARCH, dtype, fix=(
        f"give a {ARCH} checkpoint (backbone under model., head {', '.join(HEAD)}), or a 2-label "
        "Qwen2ForTokenClassification one"))


class QwenPRM(StepTagPRM):
    name = "qwen-prm"

    def __init__(self, model, tokenizer=None, tag: str = "<extra_0>", system: str | None = SYSTEM,
                 insert_tag: bool = True, step_delimiter: str | None = None, device=None, batch_size: int = 8,
                 max_length: int | None = None, dtype=None, trust_remote_code: bool = False,
                 batch_tokens: int | None = None):
        """`model`: a loaded model (with `tokenizer`) or a local folder (tokenizer None), loaded
        natively (load_qwen_prm); trust_remote_code=True runs the folder's own modeling code
        instead. system None = the card's system prompt."""
        self.trust_remote_code = trust_remote_code
        super().__init__(model, tokenizer, tag, insert_tag, step_delimiter, device, batch_size, max_length, dtype,
                         batch_tokens)
        self.system = SYSTEM if system is None else system

    def _format(self, question: str, steps: list[str]) -> str:
        answer = "".join(f"{s}{self.tag}" for s in tagged_steps(steps, self.tag))
        question = question.strip()
        if getattr(self.tok, "chat_template", None):
            messages = [{"role": "system", "content": self.system}, {"role": "user", "content": question},
                        {"role": "assistant", "content": answer}]
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        return (f"<|im_start|>system\n{self.system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
                f"<|im_start|>assistant\n{answer}<|im_end|>\n")

    def _good_prob(self, input_ids, attention_mask):
        import torch

        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        logits = out if torch.is_tensor(out) else out.logits if hasattr(out, "logits") else out[0]  # [B, T, 2]
        if logits.shape[-1] != 2:
            raise ValueError(f"a Qwen-style PRM head gives 2 logits per token, got {logits.shape[-1]}")
        return logits.float().softmax(-1)[..., 1]

    def from_folder(self, path: str | Path, dtype=None):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=self.trust_remote_code, local_files_only=True)
        return load_qwen_prm(path, dtype, self.trust_remote_code), tok


def _check(spec) -> None:
    check_target(spec)
    if spec.is_url and spec.get("system") is not None:
        raise SpecError(f"--prm {spec}: system= applies to an in-process PRM; a served qwen-prm is sent the "
                        "card's system prompt (ets.prm.served)")


register(PRMKind(
    "qwen-prm", "ChatML (the card's system prompt, the question as the user turn, the steps each ended by "
    "<extra_0> as the assistant turn): P(class 1) of the two-class head at each <extra_0> (Qwen2.5-Math-PRM)",
    ("path", "url"),
    served_or_local("qwen-prm", lambda spec, ctx: QwenPRM(
        spec.target, device=spec.get("device"), batch_size=spec.get("batch_size"), dtype=spec.get("dtype"),
        trust_remote_code=spec.get("trust_remote_code"), batch_tokens=spec.get("batch_tokens"),
        system=spec.get("system"))),
    options=(DEVICE, DTYPE, BATCH_SIZE, BATCH_TOKENS, MODEL, SYSTEM_OPTION, TRUST_REMOTE_CODE), check=_check,
    served_by="vLLM pooling (Qwen2ForProcessRewardModel, STEP pooling)",
    tested="tiny random checkpoint in the released layout (model.* + score.0/score.2): scores equal the "
           "head applied by hand; a missing or renamed head fails naming the keys; served by vLLM's CPU "
           "build equal to in-process (tests/test_prm_kinds.py); token-classification folder (tests/test_prm_hf.py)"))
