"""Policy and PRM construction from short specs (the CLI's --policy / --prm).

    make_policy(spec, **opts)
        None | "default"          -> ets.engines.hf.load_policy(None, **opts)   (embedded default model)
        "mock"                    -> ets.engines.mock.MockPolicy(seed=opts["seed"])
        "http://..." (comma list) -> ets.engines.server.ServerPolicy(urls, **opts)
        anything else (dir/GGUF)  -> ets.engines.hf.load_policy(spec, **opts)
    make_prm(spec, policy, **opts)
        None | "default"          -> ets.prm.default.DefaultPRM()  (given `policy` if it takes one)
        "mock"                    -> ets.prm.mock.MockPRM(seed=opts["seed"])
        "math-shepherd:PATH"      -> ets.prm.math_shepherd.MathShepherdPRM(PATH)
        "qwen-prm:PATH"           -> ets.prm.qwen_prm.QwenPRM(PATH)
        "learned:PATH[?any_policy=1]" -> ets.prm.learned.LearnedPRM(PATH, policy=policy, any_policy=...)
                                     (a file from `ets train-prm`; refused for another policy
                                     unless ?any_policy=1)
        "http://..."              -> ets.prm.served.ServedPRM(url)

Model modules are imported only when asked for: a mock run needs no torch import. Options that
a constructor does not take are dropped (each engine takes its own set: seed, device, ...).
"""

from __future__ import annotations

import importlib
import inspect


class SpecError(ValueError):
    """A --policy/--prm spec that cannot be built; the message says what to pass instead."""


def _call(target: str, *args, **opts):
    mod_name, attr = target.rsplit(".", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise SpecError(f"{mod_name} is not available ({e}); install the project with its "
                        "dependencies (`pip install -e .`) or choose another spec (e.g. 'mock')") from e
    fn = getattr(mod, attr, None)
    if fn is None:
        raise SpecError(f"{mod_name} has no {attr}")
    return fn(*args, **_accepted(fn, opts))


def _accepted(fn, opts: dict) -> dict:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return opts
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return opts
    return {k: v for k, v in opts.items() if k in params}


def _is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def is_embedded(spec: str | None) -> bool:
    """Whether make_policy(spec) builds the embedded engine (ets.engines.hf.load_policy)."""
    return spec != "mock" and not _is_url(spec or "")


def make_policy(spec: str | None, **opts):
    if spec in (None, "", "default"):
        return _call("ets.engines.hf.load_policy", None, **opts)
    if spec == "mock":
        return _call("ets.engines.mock.MockPolicy", **opts)
    if _is_url(spec):
        urls = [u.strip() for u in spec.split(",") if u.strip()]
        return _call("ets.engines.server.ServerPolicy", urls, **opts)
    return _call("ets.engines.hf.load_policy", spec, **opts)


def make_prm(spec: str | None, policy=None, **opts):
    if spec in (None, "", "default"):
        # the default PRM reads the policy's token log-probs from the tree; a version that
        # wants the policy object itself gets it by keyword
        return _call("ets.prm.default.DefaultPRM", **opts, **({"policy": policy} if policy is not None else {}))
    if spec == "mock":
        return _call("ets.prm.mock.MockPRM", **opts)
    if _is_url(spec):
        return _call("ets.prm.served.ServedPRM", spec, **opts)
    if "," in spec:
        raise SpecError(f"--prm {spec!r}: one PRM per run; `ets compare --prm A,B` compares several "
                        "on the same problems")
    kind, sep, path = spec.partition(":")
    if kind == "learned" and path:
        return _learned(path, policy)
    targets = {"math-shepherd": "ets.prm.math_shepherd.MathShepherdPRM", "qwen-prm": "ets.prm.qwen_prm.QwenPRM"}
    if sep and kind in targets and path:
        return _call(targets[kind], path, **opts)
    raise SpecError(f"unknown PRM spec {spec!r}; use default, mock, math-shepherd:PATH, qwen-prm:PATH, "
                    "learned:PATH or an http(s):// URL")


def prm_identity(spec: str) -> str:
    """How a PRM spec names a run (ets.runner.RunConfig.identity): the spec itself, except that a
    learned PRM is named by its file's content, so the same file under another path resumes the
    same run and a file retrained in place starts a new one."""
    import hashlib
    from pathlib import Path

    kind, _, rest = spec.partition(":")
    if kind != "learned" or not rest:
        return spec
    path, _, query = rest.partition("?")
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise SpecError(f"--prm {spec}: cannot read {path} ({e.strerror}); make one with `ets train-prm`") from e
    return f"learned:sha256={digest}" + (f"?{query}" if query else "")


def _learned(path: str, policy):
    """learned:PATH[?any_policy=1|0]: the file of `ets train-prm`, checked against `policy`."""
    from urllib.parse import parse_qsl

    path, _, query = path.partition("?")
    opts = dict(parse_qsl(query, keep_blank_values=True))
    if set(opts) - {"any_policy"} or opts.get("any_policy", "0") not in ("0", "1"):
        raise SpecError(f"learned:{path}?{query}: the only option is any_policy=1 (use the file with any policy)")
    return _call("ets.prm.learned.LearnedPRM", path, policy=policy, any_policy=opts.get("any_policy") == "1")
