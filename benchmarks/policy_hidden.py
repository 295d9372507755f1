"""The policy's own hidden state at the end of every step of a run's saved trees (an experiment
for issue 14: does a value head on what the policy "knows" separate right from wrong solutions
better than the statistics of `ets train-prm --features stats`? benchmarks/hidden_probe_cv.py
judges it).

One forward pass per leaf's chain (prompt + steps) with the prompt's KV computed once per problem,
so a node's state is read at its last token (causal attention: the state at a position depends
only on the tokens up to it, so it is the prefix's own). The trees store token ids, so nothing is
re-tokenised. Writes OUT_DIR/<problem id>.npz: `node` [N] (node ids), `h` [N, L, D] float16 (the
output of each layer in `layers`; the last layer's is after the final norm), `layers` [L].
Resumable: a problem with a file is skipped.

    python benchmarks/policy_hidden.py RUN_DIR OUT_DIR --policy MODEL.gguf|FOLDER [--layers 8,12,16,20,24]

Cost on the 2-core machine (bfloat16, the benchmark GGUF): ~300 tokens/s, e.g. 300 GSM8K train
problems x 4 rollouts (352k tokens) in 20 min.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np


def load_model(policy: str | None, dtype: str):
    """The policy's transformers model (a .gguf file is dequantized once into ets' cache, as
    `--policy FILE.gguf` does; None: the default embedded model)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ets.models import default_model_dir, gguf_model_dir

    src = Path(policy) if policy else default_model_dir()
    folder = gguf_model_dir(src) if src.suffix == ".gguf" else src
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype), local_files_only=True).eval()


def node_states(model, tree, layers) -> dict[int, np.ndarray]:
    """node id -> [L, D] float16: each layer's output at the node's last token, for every non-root
    node with tokens."""
    import torch

    root = tree.nodes[0]
    seen: dict[int, np.ndarray] = {}
    with torch.inference_mode():
        prompt = model.model(input_ids=torch.tensor([root.token_ids[:-1]]), use_cache=True).past_key_values
        for leaf in (n for n in tree.nodes[1:] if not n.children):
            chain = leaf.path()  # steps 1..leaf
            if all(n.id in seen or not n.token_ids for n in chain):
                continue
            # from the prompt's last token on, so position t + 1 is the chain's token t
            ids = [root.token_ids[-1]] + [t for n in chain for t in n.token_ids]
            out = model.model(input_ids=torch.tensor([ids]), past_key_values=copy.deepcopy(prompt),
                              output_hidden_states=True)
            h = torch.stack([out.hidden_states[i][0] for i in layers], 1)  # [T, L, D]
            end = 0
            for n in chain:
                end += len(n.token_ids)
                if n.token_ids and n.id not in seen:
                    seen[n.id] = h[end].float().numpy().astype(np.float16)
    return seen


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--policy", default=None, help="the policy's .gguf file or transformers folder (default: the embedded default)")
    p.add_argument("--layers", default="8,12,16,20,24", help="hidden_states indices (0 = the embeddings)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--limit", type=int, default=None, help="the first N problems (file-name order)")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()

    import torch

    from ets.runs import RunDir
    from ets.treeio import tree_from_dict

    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(a.policy, a.dtype)
    layers = [int(x) for x in a.layers.split(",")]
    if not all(0 <= i <= model.config.num_hidden_layers for i in layers):
        p.error(f"--layers must be in 0..{model.config.num_hidden_layers} for this model")
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = tokens = 0
    t0 = time.time()
    for rec in RunDir(a.run_dir).iter_problems():
        if a.limit is not None and done >= a.limit:
            break
        done += 1
        dst = out / f"{rec['id']}.npz"
        if dst.exists():
            continue
        tree = tree_from_dict(rec["tree"])
        states = node_states(model, tree, layers)
        tokens += sum(len(n.token_ids) for n in tree.nodes[1:])
        ids = np.array(sorted(states), np.int64)
        h = np.stack([states[i] for i in ids]) if len(ids) else np.zeros((0, len(layers), model.config.hidden_size), np.float16)
        tmp = dst.with_suffix(".tmp.npz")
        np.savez(tmp, node=ids, h=h, layers=np.array(layers, np.int64))
        tmp.replace(dst)  # a killed run leaves no half file
        el = time.time() - t0
        print(f"{done} {rec['id']}: {tokens} tokens in {el:.0f} s ({tokens / el:.0f} tok/s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
