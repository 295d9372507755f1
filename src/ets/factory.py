"""Policy and PRM construction from short specs (the CLI's --policy / --prm).

    make_policy(spec, **opts)
        None | "default"          -> ets.engines.hf.load_policy(None, **opts)   (embedded default model)
        "mock"                    -> ets.engines.mock.MockPolicy(seed=opts["seed"])
        "http://..." (comma list) -> ets.engines.server.ServerPolicy(urls, **opts)
        anything else (dir/GGUF)  -> ets.engines.hf.load_policy(spec, **opts)
    make_prm(spec, policy, **opts)  -> the PRM registry (ets.prm.registry): KIND[:TARGET][?options]

Model modules are imported only when asked for: a mock run needs no torch import. Options that
a constructor does not take are dropped (each engine takes its own set: seed, device, ...).
"""

from __future__ import annotations

import importlib
import inspect

from ets.prm.registry import SpecError  # one error type for --policy and --prm specs


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
    """The reward model of `spec` (ets.prm.registry: KIND[:TARGET][?options]); `opts` may hold
    seed (the run's) and timeout_s (served kinds' HTTP timeout)."""
    from ets.prm import registry

    ctx = registry.BuildContext(policy=policy, seed=opts.get("seed") or 0, timeout_s=opts.get("timeout_s"))
    return registry.build(registry.parse(spec or "default"), ctx)


def prm_identity(spec: str) -> str:
    """How a PRM spec names a run (ets.runner.RunConfig.identity): ets.prm.registry.identity."""
    from ets.prm import registry

    return registry.identity(spec)
