"""The PRM registry: every kind of reward model registers itself here by name, and `--prm` specs
are parsed, checked and built through it (the CLI, ets.checks and docs/prms.md read it).

A spec is `KIND[:TARGET][?KEY=VALUE&KEY=VALUE...]`:
    TARGET   a local model folder or file (the PRM runs in-process), an http(s):// URL (it is
             served), or nothing (kinds that need no model: default, mock, reference)
    options  the kind's own (PRMKind.options), typed and checked, e.g. `?device=cuda&dtype=bfloat16`
A bare http(s):// URL means `qwen-prm:URL` (vLLM's pooling API), as before the registry.
Examples: `default`, `mock`, `reference?noise=0.5`, `qwen-prm:/models/Qwen2.5-Math-PRM-7B?device=cuda`,
`math-shepherd:http://127.0.0.1:8001`, `judge:http://127.0.0.1:8000`, `learned:FILE.npz?any_policy=1`.

Contract of a kind (PRMKind): `build(spec, ctx)` returns a RewardModel (ets.prm.base) for a spec
whose target and options `parse`/`check` accepted; `check(spec)` raises SpecError for what can be
known without loading a model or contacting a server (a missing folder, a malformed URL), so bad
input fails before anything is made; `identity(spec)` is what names a run (default: the canonical
spec; a learned file is named by its content). Importing a kind's module loads no model and no
torch: heavy imports wait for `build`.

Kinds register with `register(PRMKind(...))` at the bottom of their module; the modules in
KIND_MODULES are imported on the first look-up, and so are those named by the `ets.prm_kinds`
entry-point group, so a package of one's own can add a kind without editing this one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qsl, quote

KIND_MODULES = ("ets.prm.default", "ets.prm.mock", "ets.prm.reference", "ets.prm.learned",
                "ets.prm.math_shepherd", "ets.prm.qwen_prm", "ets.prm.skywork",
                "ets.prm.rlhflow", "ets.prm.judge", "ets.prm.orm")
ENTRY_POINT_GROUP = "ets.prm_kinds"


class SpecError(ValueError):
    """A --prm/--policy spec that cannot be built; the message says what to pass instead."""


@dataclass(frozen=True)
class Option:
    """One option of a kind: `name=value` in a spec, or the CLI flag `--prm-<name>` where one exists."""

    name: str
    type: type  # int | float | str | bool
    default: Any
    help: str
    choices: tuple | None = None
    names_run: bool = True  # whether it changes scores, so is part of a run's identity (device does not)

    def parse(self, text: str, spec: str) -> Any:
        if self.type is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise SpecError(f"--prm {spec}: {self.name}={text!r} must be 1 or 0")
            value: Any = text.lower() in ("1", "true", "yes")
        elif self.type in (int, float):
            try:
                value = self.type(text)
            except ValueError:
                raise SpecError(f"--prm {spec}: {self.name}={text!r} is not {'an integer' if self.type is int else 'a number'}") from None
            if self.type is float and not (value == value and abs(value) != float("inf")):
                raise SpecError(f"--prm {spec}: {self.name}={text!r} is not a finite number")
        else:
            value = text
        if self.choices is not None and value not in self.choices:
            raise SpecError(f"--prm {spec}: {self.name}={text!r}; choose one of {list(self.choices)}")
        return value


@dataclass(frozen=True)
class PRMSpec:
    """A parsed spec. `options` holds only what the spec sets (typed), sorted by name; `get`
    falls back to the kind's defaults."""

    kind: str
    target: str | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def is_url(self) -> bool:
        return self.target is not None and self.target.startswith(("http://", "https://"))

    def get(self, name: str) -> Any:
        given = dict(self.options)
        if name in given:
            return given[name]
        return kind_of(self.kind).option(name).default

    def with_options(self, **values) -> PRMSpec:
        merged = dict(self.options)
        merged.update(values)
        return PRMSpec(self.kind, self.target, tuple(sorted(merged.items())))

    def __str__(self) -> str:
        text = self.kind + (f":{self.target}" if self.target is not None else "")
        if self.options:
            def show(v):
                if isinstance(v, bool):
                    return "1" if v else "0"
                return format(v, ".12g") if isinstance(v, float) else str(v)
            text += "?" + "&".join(f"{k}={quote(show(v), safe='/:.,-_')}" for k, v in self.options)
        return text


@dataclass(frozen=True)
class BuildContext:
    """What a kind may need besides its spec: the policy (the default and learned PRMs read its
    log-probs or check its identity), the run's seed, the HTTP timeout of served kinds."""

    policy: Any = None
    seed: int = 0
    timeout_s: float | None = None


@dataclass(frozen=True)
class PRMKind:
    name: str
    summary: str  # what it scores and how: the model card's input format, one line (docs/prms.md)
    targets: tuple[str, ...]  # of "none", "path", "url": what may follow `KIND:`
    build: Callable[[PRMSpec, BuildContext], Any]
    options: tuple[Option, ...] = ()
    check: Callable[[PRMSpec], None] | None = None  # extra checks; no model, no network
    identity: Callable[[PRMSpec], str] | None = None
    tested: str = ""  # how it is tested (docs/prms.md)
    served_by: str = ""  # what serves it ("" when it runs in-process only)
    uses_answer_key: bool = False  # reads the problem's reference solution (never a default)

    def option(self, name: str) -> Option:
        for o in self.options:
            if o.name == name:
                return o
        raise SpecError(f"PRM kind {self.name} has no option {name!r}; its options: "
                        f"{[o.name for o in self.options] or 'none'}")


KINDS: dict[str, PRMKind] = {}
_loaded = False


def register(kind: PRMKind) -> PRMKind:
    if kind.name in KINDS and KINDS[kind.name] is not kind:
        raise ValueError(f"PRM kind {kind.name!r} is registered twice")
    KINDS[kind.name] = kind
    return kind


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in KIND_MODULES:
        importlib.import_module(mod)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def kinds() -> dict[str, PRMKind]:
    """Every registered kind, by name, in name order (not import order, which differs by caller)."""
    _load()
    return dict(sorted(KINDS.items()))


def kind_of(name: str) -> PRMKind:
    _load()
    if name not in KINDS:
        raise SpecError(f"unknown PRM kind {name!r}; use one of {', '.join(sorted(KINDS))} "
                        "(KIND:PATH for a local model, KIND:http://HOST:PORT for a served one)")
    return KINDS[name]


def spec_forms() -> str:
    """Every kind's spec form, for help texts and error messages."""
    forms = []
    for k in kinds().values():
        t = [{"none": k.name, "path": f"{k.name}:PATH", "url": f"{k.name}:URL"}[x] for x in k.targets]
        forms.append(" | ".join(dict.fromkeys(t)))
    return ", ".join(forms) + ", or an http(s):// URL (qwen-prm served)"


def parse(text: str) -> PRMSpec:
    """A spec string -> PRMSpec, its target and options checked against the kind (no model loaded)."""
    text = (text or "default").strip()
    if "," in text and not text.startswith(("http://", "https://")):
        raise SpecError(f"--prm {text!r}: one PRM per run; `ets compare --prm A,B` compares several "
                        "on the same problems")
    if text.startswith(("http://", "https://")):
        return _finish(PRMSpec("qwen-prm", text), text)
    head, _, query = text.partition("?")
    name, sep, target = head.partition(":")
    if target.startswith("//"):
        raise SpecError(f"--prm: {text!r} is not an http(s) URL; use http://HOST:PORT (or KIND:http://HOST:PORT)")
    kind = kind_of(name)
    if sep and not target:
        raise SpecError(f"--prm {text!r}: nothing after '{name}:'; give a path or URL, or drop the colon")
    opts = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False) if query else ():
        if key in opts:
            raise SpecError(f"--prm {text}: option {key!r} is given twice")
        try:
            opt = kind.option(key)
        except SpecError as e:
            raise SpecError(f"--prm {text}: {e}") from None
        opts[key] = opt.parse(value, text)
    if query and not opts:
        raise SpecError(f"--prm {text}: cannot read the options after '?'; write KEY=VALUE&KEY=VALUE")
    return _finish(PRMSpec(name, target or None, tuple(sorted(opts.items()))), text)


def _finish(spec: PRMSpec, text: str) -> PRMSpec:
    kind = kind_of(spec.kind)
    where = "none" if spec.target is None else "url" if spec.is_url else "path"
    if where not in kind.targets:
        want = {"none": f"{kind.name}", "path": f"{kind.name}:PATH", "url": f"{kind.name}:http://HOST:PORT"}
        raise SpecError(f"--prm {text}: PRM kind {kind.name} takes " + " or ".join(want[t] for t in kind.targets))
    return spec


def with_flag_options(spec: PRMSpec, flags: dict[str, Any], strict: bool = True) -> PRMSpec:
    """`spec` with the CLI's --prm-* values (name -> value, None = not given) for the options its
    kind has. A value the spec sets differently is an error (neither silently wins); a flag the
    kind does not have is an error when `strict` (ets run), skipped otherwise (ets compare over
    several kinds: it applies where it is known)."""
    kind = kind_of(spec.kind)
    names = {o.name for o in kind.options}
    given = dict(spec.options)
    add = {}
    for name, value in flags.items():
        if value is None:
            continue
        if name not in names:
            if strict:
                raise SpecError(f"--prm-{name.replace('_', '-')} does not apply to PRM kind {kind.name} "
                                f"(its options: {sorted(names) or 'none'})")
            continue
        value = kind.option(name).parse(str(value), str(spec)) if not isinstance(value, kind.option(name).type) else value
        if name in given and given[name] != value:
            raise SpecError(f"--prm-{name.replace('_', '-')} {value!r} disagrees with {name}={given[name]!r} "
                            f"in --prm {spec}; give it once")
        add[name] = value
    return spec.with_options(**add) if add else spec


def check(spec: PRMSpec) -> None:
    """What can be checked of `spec` without a model or a network (SpecError otherwise)."""
    kind = kind_of(spec.kind)
    if kind.check is not None:
        kind.check(spec)


def build(spec: PRMSpec | str, ctx: BuildContext | None = None):
    """The RewardModel of `spec`."""
    spec = parse(spec) if isinstance(spec, str) else spec
    return kind_of(spec.kind).build(spec, ctx or BuildContext())


def identity(spec: PRMSpec | str) -> str:
    """How the PRM names a run (ets.runner.RunConfig.identity): the canonical spec, or the kind's
    own identity (a learned file by its content). A spec of a kind that did not exist when
    older runs were named is new; the old spellings (default, mock, KIND:PATH, URLs) are kept."""
    text = spec if isinstance(spec, str) else str(spec)
    parsed = parse(text) if isinstance(spec, str) else spec
    kind = kind_of(parsed.kind)
    if kind.identity is not None:
        return kind.identity(parsed)
    if isinstance(spec, str) and spec.strip().startswith(("http://", "https://")):
        return spec.strip()  # as runs named before the registry
    # options that change no score (device, batch size) and options at their defaults do not
    # name the run: the same PRM on another GPU, or spelled out in full, resumes the same run
    named = tuple((k, v) for k, v in parsed.options if kind.option(k).names_run and v != kind.option(k).default)
    return str(PRMSpec(parsed.kind, parsed.target, named))


def flag_options() -> dict[str, Option]:
    """Every option of every kind, by name: the CLI makes one --prm-NAME flag of each (the first
    kind's help and type; options of one name share their meaning across kinds)."""
    out: dict[str, Option] = {}
    for k in kinds().values():
        for o in k.options:
            out.setdefault(o.name, o)
    return out


def owners(name: str) -> list[str]:
    return [k.name for k in kinds().values() if any(o.name == name for o in k.options)]


# -- shared checks -------------------------------------------------------------------------------

def check_url(url: str, what: str) -> None:
    import httpx

    from ets.http import redact_url

    try:
        u = httpx.URL(url)
        port = u.port
    except Exception as e:  # noqa: BLE001  (httpx raises several kinds for bad URLs)
        raise SpecError(f"{what}: {redact_url(url)!r} is not a valid URL ({redact_url(str(e))}); use http://HOST:PORT") from None
    if u.scheme not in ("http", "https") or not u.host:
        raise SpecError(f"{what}: {redact_url(url)!r} is not an http(s) URL with a host; use http://HOST:PORT")
    if port is not None and not 0 < port < 65536:
        raise SpecError(f"{what}: port {port} out of range in {redact_url(url)!r}")


def check_model_dir(target: str, what: str) -> None:
    """A local transformers model: a folder with a readable config.json naming its model_type."""
    from pathlib import Path

    path = Path(target).expanduser()
    if not path.is_dir():
        raise SpecError(f"{what}: no such model folder {path} (models are never downloaded: give a local "
                        "folder, or a served model's URL)")
    check_model_config(path, what)


def check_model_config(path, what: str) -> None:
    """`path`'s config.json exists, is JSON and names a model_type (a transformers model folder)."""
    import json

    cfg = path / "config.json"
    if not cfg.is_file():
        raise SpecError(f"{what}: {path} has no config.json, so it is not a transformers model folder")
    try:
        obj = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SpecError(f"{what}: {cfg} is not valid JSON ({e}); fix or replace the model folder") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model_type"), str):
        raise SpecError(f"{what}: {cfg} names no model_type; it is not a transformers model config")


def check_target(spec: PRMSpec) -> None:
    """The common check of a model kind: a well-formed URL, or a local model folder."""
    if spec.target is None:
        return
    if spec.is_url:
        check_url(spec.target, f"--prm {spec}")
    else:
        check_model_dir(spec.target, f"--prm {spec}")


# Options most model kinds share (each kind lists the ones it takes).
DEVICE = Option("device", str, None, "torch device of an in-process PRM (cpu, cuda, cuda:N; default: cuda when there is one)",
                names_run=False)
DTYPE = Option("dtype", str, None, "weights' dtype of an in-process PRM (default: the checkpoint's)",
               ("float32", "bfloat16", "float16", None))
BATCH_SIZE = Option("batch_size", int, 8, "paths per forward (in-process) or per request (served)", names_run=False)
BATCH_TOKENS = Option("batch_tokens", int, None, "cap on padded tokens per forward (in-process; default: none)",
                      names_run=False)
MODEL = Option("model", str, None, "the served model's name (default: the server's only model)")
SYSTEM = Option("system", str, None, "system prompt (default: the model card's)")
TRUST_REMOTE_CODE = Option("trust_remote_code", bool, False, "run the checkpoint's own modeling code (only where a kind needs it)")


def markdown_table() -> str:
    """docs/prms.md's table, from the registry itself (`ets prms --markdown`; a test keeps the
    committed page equal to it)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| kind | spec | input format and score | in-process | served | options | tested |",
             "|---|---|---|---|---|---|---|"]
    for k in kinds().values():
        forms = {"none": f"`{k.name}`", "path": f"`{k.name}:PATH`", "url": f"`{k.name}:URL`"}
        spec = ", ".join(forms[t] for t in k.targets)
        inproc = "yes" if "path" in k.targets else "yes (no model)" if "none" in k.targets else "no"
        served = k.served_by or "-"
        opts = ", ".join(f"`{o.name}`" for o in k.options) or "-"
        lines.append(f"| {k.name} | {spec} | {cell(k.summary)} | {inproc} | {cell(served)} | {opts} | {cell(k.tested)} |")
    return "\n".join(lines)
