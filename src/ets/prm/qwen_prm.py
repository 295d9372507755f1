"""Qwen2.5-Math-PRM-style adapter: "<extra_0>" after each step, a reward head giving two-class
logits per token; the step score is softmax(logits)[..., 1] at each separator position.

Input (as in the model card): chat template with the system prompt below, the question as the
user turn, and the assistant turn "step1<extra_0>step2<extra_0>...". Without a chat template
the same parts are joined by newlines.
"""

from __future__ import annotations

from pathlib import Path

from ets.prm.math_shepherd import StepTagPRM, served_or_local
from ets.prm.registry import BATCH_SIZE, DEVICE, DTYPE, MODEL, PRMKind, TRUST_REMOTE_CODE, check_target, register

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


class QwenPRM(StepTagPRM):
    name = "qwen-prm"

    def __init__(self, model, tokenizer=None, tag: str = "<extra_0>", system: str = SYSTEM,
                 insert_tag: bool = True, step_delimiter: str | None = None, device=None, batch_size: int = 8,
                 max_length: int | None = None, dtype=None, trust_remote_code: bool = False):
        """`model`: a loaded model (with `tokenizer`) or a local folder (tokenizer None).
        Qwen2.5-Math-PRM needs trust_remote_code=True (its reward head is remote code); a folder
        holding a 2-label token-classification model loads without it."""
        self.trust_remote_code = trust_remote_code
        super().__init__(model, tokenizer, tag, insert_tag, step_delimiter, device, batch_size, max_length, dtype)
        self.system = system

    def _format(self, question: str, steps: list[str]) -> str:
        answer = "".join(f"{s}{self.tag}" for s in steps)
        if getattr(self.tok, "chat_template", None):
            messages = [{"role": "system", "content": self.system}, {"role": "user", "content": question},
                        {"role": "assistant", "content": answer}]
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        return f"{self.system}\n{question}\n{answer}"

    def _good_prob(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        logits = out.logits if hasattr(out, "logits") else out[0]  # [B, T, 2]
        if logits.shape[-1] != 2:
            raise ValueError(f"a Qwen-style PRM head gives 2 logits per token, got {logits.shape[-1]}")
        return logits.float().softmax(-1)[..., 1]

    def from_folder(self, path: str | Path, dtype=None):
        from transformers import AutoModel, AutoModelForTokenClassification, AutoTokenizer

        trc = self.trust_remote_code
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trc, local_files_only=True)
        if trc:
            return AutoModel.from_pretrained(str(path), dtype=dtype or "auto", trust_remote_code=True, local_files_only=True), tok
        return AutoModelForTokenClassification.from_pretrained(str(path), dtype=dtype or "auto", local_files_only=True), tok


register(PRMKind(
    "qwen-prm", "ChatML (the card's system prompt, the question as the user turn, the steps each ended by "
    "<extra_0> as the assistant turn): P(class 1) of the two-class head at each <extra_0> (Qwen2.5-Math-PRM)",
    ("path", "url"),
    served_or_local("qwen-prm", lambda spec, ctx: QwenPRM(
        spec.target, device=spec.get("device"), batch_size=spec.get("batch_size"), dtype=spec.get("dtype"),
        trust_remote_code=spec.get("trust_remote_code"))),
    options=(DEVICE, DTYPE, BATCH_SIZE, MODEL, TRUST_REMOTE_CODE), check=check_target,
    served_by="vLLM pooling (Qwen2ForProcessRewardModel, STEP pooling)",
    tested="tiny token-classification checkpoint (tests/test_prm_hf.py)"))
