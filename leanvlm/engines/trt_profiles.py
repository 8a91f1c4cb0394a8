"""TensorRT optimisation profiles of an engine's graphs, from the manifest's limits and graph IO.

Every dynamic input dimension of the exported graphs is named (spec/names.py, the manifest's `graphs`
section); this module gives each name its min/opt/max:

- `batch_size`: 1 .. max_batch (opt: --opt-batch, default 1).
- `sequence_length` (prefill, and the embed graph's prefill profile): a prompt holds every LLM image token
  plus at least one text token, up to max_prompt (opt: --opt-prompt, default image tokens + 64 text tokens).
- `num_image_tokens` (embed): the image tokens of a prompt, fixed by the schedule; 0 in decode.
- `past_sequence_length_{g}` (decode): the whole KV buffer of cache group g, which the runtime sizes per
  request as the group's prompt length + the request's max_new_tokens (>= 1), up to the group's capacity.
- `total_sequence_length_{g}` (decode masks): past + 1.

The embed graph runs twice per token shape: once per prompt (L tokens, N image features) and once per decoded
token (1 token, 0 features), so it gets a prefill profile and a decode profile; the other graphs one each.
A dimension this module does not know is an error naming it, not a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from leanvlm.errors import EngineError, UserError
from leanvlm.spec import defaults, names
from leanvlm.spec.engine import EngineSpec

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


@dataclass(frozen=True)
class ProfileLimits:
    """The shapes a build covers: the manifest's limits or tighter ones (a Jetson with little memory)."""

    max_batch: int
    max_prompt: int
    max_new_tokens: int
    opt_batch: int
    opt_prompt: int
    opt_new_tokens: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def profile_limits(spec: EngineSpec, max_batch: int | None = None, max_prompt: int | None = None,
                   max_new_tokens: int | None = None, opt_batch: int | None = None,
                   opt_prompt: int | None = None) -> ProfileLimits:
    """Validated build limits: each at most the engine's (its KV capacity and checks were sized for those),
    opt within [min, max]. Errors name the flag."""
    lim, n_img = spec.limits, spec.model.num_image_tokens
    min_prompt = n_img + 1

    def pick(flag: str, value: int | None, default: int, lo: int, hi: int) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise UserError(f"{flag} {value}: must be an integer in [{lo}, {hi}] for this engine")
        return value

    mb = pick("--max-batch", max_batch, lim.max_batch, 1, lim.max_batch)
    mp = pick("--max-prompt", max_prompt, lim.max_prompt, min_prompt, lim.max_prompt)
    mn = pick("--max-new-tokens", max_new_tokens, lim.max_new_tokens, 1, lim.max_new_tokens)
    ob = pick("--opt-batch", opt_batch, 1, 1, mb)
    op = pick("--opt-prompt", opt_prompt, min(mp, n_img + defaults.FLOPS_TEXT_TOKENS), min_prompt, mp)
    return ProfileLimits(mb, mp, mn, ob, op, min(defaults.GENERATE_MAX_NEW_TOKENS, mn))


def _dims(spec: EngineSpec, lim: ProfileLimits, phase: str) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every named dimension in one phase ("prefill" or "decode")."""
    n_img = spec.model.num_image_tokens
    dims = {"batch_size": (1, lim.opt_batch, lim.max_batch)}
    if phase == "prefill":
        dims["sequence_length"] = (n_img + 1, lim.opt_prompt, lim.max_prompt)
        dims["num_image_tokens"] = (n_img, n_img, n_img)
        for g in spec.cache_groups:  # outputs only, listed for completeness of the record
            dropped = n_img - g.image_tokens
            dims[names.group_axis(g.index, "present_sequence_length")] = (
                n_img + 1 - dropped, lim.opt_prompt - dropped, lim.max_prompt - dropped)
    else:
        dims["sequence_length"] = (1, 1, 1)
        dims["num_image_tokens"] = (0, 0, 0)
        for g in spec.cache_groups:
            dropped = n_img - g.image_tokens
            past = (n_img + 1 - dropped + 1, lim.opt_prompt - dropped + lim.opt_new_tokens,
                    lim.max_prompt - dropped + lim.max_new_tokens)
            if past[2] > g.capacity:
                raise EngineError(f"cache group {g.index}: build limits need {past[2]} KV entries, past the "
                                  f"manifest's capacity {g.capacity}")
            dims[names.group_axis(g.index, "past_sequence_length")] = past
            dims[names.group_axis(g.index, "total_sequence_length")] = tuple(p + 1 for p in past)
    return dims


# Which phases' shapes each graph is run with.
GRAPH_PHASES = {"vision": ("prefill",), "embed": ("prefill", "decode"), "prefill": ("prefill",),
                "decode": ("decode",)}


def graph_profiles(spec: EngineSpec, lim: ProfileLimits) -> dict[str, list[Profile]]:
    """Per graph, its optimisation profiles in order (profile index = position): input name -> (min, opt, max),
    read from the manifest's graph inputs."""
    if not spec.graphs:
        raise EngineError("this engine spec has no graph IO section (an in-memory spec); build from an engine "
                          "directory")
    out: dict[str, list[Profile]] = {}
    for graph in names.GRAPH_NAMES:
        io = spec.graphs.get(graph)
        if io is None:
            raise EngineError(f"manifest lists no graph {graph!r}")
        profiles = []
        for phase in GRAPH_PHASES[graph]:
            dims = _dims(spec, lim, phase)
            prof: Profile = {}
            for inp in io["inputs"]:
                shape = inp["shape"]
                if all(isinstance(d, int) for d in shape):
                    continue  # static: TensorRT needs no profile entry
                lo, opt, hi = [], [], []
                for d in shape:
                    if isinstance(d, int):
                        triple = (d, d, d)
                    elif d in dims:
                        triple = dims[d]
                    else:
                        raise EngineError(f"{graph}: input {inp['name']} has dimension {d!r}, which the TensorRT "
                                          f"profile builder does not know (known: {', '.join(sorted(dims))})")
                    lo.append(triple[0])
                    opt.append(triple[1])
                    hi.append(triple[2])
                prof[inp["name"]] = (tuple(lo), tuple(opt), tuple(hi))
            profiles.append(prof)
        out[graph] = profiles
    return out


def profile_for(graph: str, phase: str) -> int:
    """Index of the profile a graph runs in a phase (the embed graph's decode profile is 1)."""
    return GRAPH_PHASES[graph].index(phase) if phase in GRAPH_PHASES[graph] else 0


def profiles_to_json(profiles: dict[str, list[Profile]]) -> dict:
    """JSON form for the build record: {graph: [{input: {min, opt, max}}]}."""
    return {g: [{name: {"min": list(a), "opt": list(b), "max": list(c)} for name, (a, b, c) in p.items()}
                for p in ps] for g, ps in profiles.items()}


def profiles_from_json(data: dict) -> dict[str, list[Profile]]:
    return {g: [{name: (tuple(s["min"]), tuple(s["opt"]), tuple(s["max"])) for name, s in p.items()} for p in ps]
            for g, ps in data.items()}
