"""Compress-rate specs: HRank's list syntax and name -> rate maps, resolved to one rate per conv.

A rate is the fraction of a conv's filters to remove: ``int(rate * C)`` filters go (HRank's rule). Two ways
to give rates:

- HRank's list syntax, ``[0.1]+[0.60]*35+[0.0]*2+...``: one entry per rate entry of a registered model, in
  the official order (``hrank info --model NAME`` lists it). Parsed by a small recursive-descent parser,
  never ``eval``. The official quirks are applied (VGG's 13th entry is forced to 0).
- A mapping of conv names or glob patterns to rates (``{"layer3.*.conv1": 0.5}``), from Python, a
  YAML/JSON file or a CLI string ``"layer1.*.conv1=0.5,layer2.*=0.3"``; it works for any model.

A :class:`Spec` is the resolved result: ``spec.rates`` maps conv names to rates. Convs it does not name
are not pruned and do not vote when a coupled group's width is chosen (see :mod:`hrank.plan`).
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from hrank import models
from hrank.errors import HRankError
from hrank.io import load_yaml_mapping
from hrank.layers import conv_names

__all__ = ["parse_rates", "parse_mapping_string", "Spec", "num_pruned", "OFFICIAL_COUNTER_ENTRY_REMAP"]

# The official FLOPs counter builds GoogLeNet with inception c4 reading compress_rate[6] (a constructor
# bug) while mask.py prunes c4 with compress_rate[5]. Our spec follows mask.py (what is pruned); this table
# lets the report also show the official counter's number. Maps arch -> {entry pruned: entry counted}.
OFFICIAL_COUNTER_ENTRY_REMAP: dict[str, dict[int, int]] = {"googlenet": {5: 6}}


def num_pruned(rate: float, channels: int) -> int:
    """HRank's rule: ``int(rate * C)`` filters are removed (float arithmetic, as the official code)."""
    return int(rate * channels)


# --------------------------------------------------------------------------------------------------------
# HRank list syntax: expr := term ('+' term)* ; term := [INT '*'] list ('*' INT)* ; list := '[' num (',' num)* ']'
# --------------------------------------------------------------------------------------------------------


def _is_digit(c: str) -> bool:
    """An ASCII digit (``str.isdigit`` also takes superscripts such as "²", which int() and float() refuse)."""
    return "0" <= c <= "9" and len(c) == 1


class _Parser:
    """Recursive-descent parser over the raw string; every error names its 1-based column."""

    def __init__(self, text: str, max_entries: int = 100_000, bound_reason: str = "") -> None:
        self.text = text
        self.pos = 0
        self.max_entries = max_entries
        self.bound_reason = bound_reason

    def error(self, message: str, pos: int | None = None) -> HRankError:
        col = (self.pos if pos is None else pos) + 1
        return HRankError(f"compress_rate syntax error at column {col}: {message} in {self.text!r}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def found(self) -> str:
        ch = self.peek()
        return f"found {ch!r}" if ch else "found the end"

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            raise self.error(f"expected {ch!r}, {self.found()}")
        self.pos += 1

    def number(self) -> float:
        self.skip_ws()
        start = self.pos
        t = self.text
        i = start
        if i < len(t) and t[i] in "+-":
            i += 1
        digits = 0
        while i < len(t) and _is_digit(t[i]):
            i, digits = i + 1, digits + 1
        if i < len(t) and t[i] == ".":
            i += 1
            while i < len(t) and _is_digit(t[i]):
                i, digits = i + 1, digits + 1
        if digits == 0:
            raise self.error(f"expected a number, {self.found()}")
        if i < len(t) and t[i] in "eE":
            j = i + 1
            if j < len(t) and t[j] in "+-":
                j += 1
            if j < len(t) and _is_digit(t[j]):
                while j < len(t) and _is_digit(t[j]):
                    j += 1
                i = j
        self.pos = i
        return float(t[start:i])

    def integer(self) -> int:
        """A repeat count, at most ``max_entries + 1`` (larger counts are clipped: the bound is exceeded anyway)."""
        self.skip_ws()
        start = self.pos
        while self.pos < len(self.text) and _is_digit(self.text[self.pos]):
            self.pos += 1
        if self.pos == start:
            raise self.error(f"expected a repeat count (a whole number), {self.found()}")
        if self.pos < len(self.text) and self.text[self.pos] in ".eE":
            raise self.error("a repeat count must be a whole number", start)
        digits = self.text[start:self.pos].lstrip("0") or "0"
        if len(digits) > len(str(self.max_entries)):  # never int() a huge digit string
            return self.max_entries + 1
        return min(int(digits), self.max_entries + 1)

    def too_long(self, start: int) -> HRankError:
        """The error for a string that expands past the bound (``start``: where the offending term begins)."""
        why = self.bound_reason or f"at most {self.max_entries} are accepted"
        return HRankError(f"compress_rate expands to more than {self.max_entries} entries (from column {start + 1}); "
                          f"{why}")

    def bracket_list(self) -> list[float]:
        self.expect("[")
        start = self.pos
        values = [self.number()]
        while self.peek() == ",":
            self.pos += 1
            values.append(self.number())
            if len(values) > self.max_entries:
                raise self.too_long(start)
        self.expect("]")
        return values

    def term(self, before: int) -> list[float]:
        """One ``[...]*n`` term, expanded only after ``before + len * n`` is checked against the bound."""
        start = self.pos
        count = 1
        if _is_digit(self.peek()):  # 35*[0.6], as Python allows
            count = self.integer()
            self.expect("*")
        if self.peek() != "[":
            raise self.error(f"expected '[', {self.found()}")
        values = self.bracket_list()
        while self.peek() == "*":
            self.pos += 1
            count = min(count * self.integer(), self.max_entries + 1)  # clipped: exact up to the bound
        if before + len(values) * count > self.max_entries:
            raise self.too_long(start)
        return values * count

    def parse(self) -> list[float]:
        if not self.peek():
            raise self.error("empty compress_rate")
        values = self.term(0)
        while self.peek() == "+":
            self.pos += 1
            values += self.term(len(values))
        if self.peek():
            raise self.error(f"expected '+' or the end, {self.found()}")
        return values


# With no model at hand, the expanded list is bounded by this many entries: far more than any CNN has
# (ResNet-110: 109), small enough that a typo like [0.1]*100000000 fails at once instead of after 1 GB.
MAX_RATE_ENTRIES = 100_000


def parse_rates(text: str, max_entries: int | None = None) -> list[float]:
    """Parse HRank's list syntax (``[0.1]+[0.6]*35+[0.0, 0.1]``) into a flat list of floats.

    Supports ``[a]``, ``[a, b, ...]``, ``*n`` (also ``n*[...]``), ``+`` and whitespace; never evaluates code.
    Syntax errors are one line naming the column. Values are not range-checked here (see :class:`Spec`).
    The expanded length is bounded *before* anything is expanded: by ``max_entries`` (e.g. the model's
    number of rate entries) or, with none given, by :data:`MAX_RATE_ENTRIES`.
    """
    if not isinstance(text, str):
        raise HRankError(f"compress_rate must be a string, got {type(text).__name__}")
    if max_entries is None:
        parser = _Parser(text, MAX_RATE_ENTRIES, f"the fixed bound {MAX_RATE_ENTRIES} applies when the model's "
                                                 "entry count is not given (no model has that many)")
    else:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        parser = _Parser(text, max_entries, f"the model has {max_entries} rate entries")
    values = parser.parse()
    for v in values:
        if not math.isfinite(v):
            raise HRankError(f"compress_rate holds a non-finite value {v!r}")
    return values


def encode_rates(rates: Sequence[float], max_period: int = 4) -> str:
    """The shortest-reading list syntax for ``rates``: repeats of one value or of a short pattern
    (``[0.0, 0.5]*18``, as a ResNet's alternating stream/inner entries give), the rest as plain lists."""
    out: list[str] = []
    pending: list[float] = []

    def flush() -> None:
        if pending:
            out.append("[" + ", ".join(repr(r) for r in pending) + "]")
            pending.clear()

    i = 0
    while i < len(rates):
        best_period, best_count = 1, 1
        for period in range(1, max_period + 1):
            block = list(rates[i:i + period])
            if len(block) < period:
                break
            count = 1
            while list(rates[i + count * period:i + (count + 1) * period]) == block:
                count += 1
            if count > 1 and period * count > best_period * best_count:
                best_period, best_count = period, count
        if best_count == 1:
            pending.append(rates[i])
            i += 1
            continue
        flush()
        block = rates[i:i + best_period]
        out.append("[" + ", ".join(repr(r) for r in block) + f"]*{best_count}")
        i += best_period * best_count
    flush()
    return "+".join(out)


def parse_mapping_string(text: str) -> dict[str, float]:
    """``"layer1.*.conv1=0.5, layer2.*=0.3"`` -> ``{"layer1.*.conv1": 0.5, "layer2.*": 0.3}`` (order kept)."""
    out: dict[str, float] = {}
    for i, part in enumerate(p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" not in part:
            raise HRankError(f"rates item {i + 1} {part!r} is not PATTERN=RATE (e.g. 'layer1.*.conv1=0.5')")
        pattern, value = (s.strip() for s in part.rsplit("=", 1))
        if not pattern:
            raise HRankError(f"rates item {i + 1} {part!r} has an empty layer pattern")
        try:
            out[pattern] = float(value)
        except ValueError:
            raise HRankError(f"rates item {i + 1} {part!r}: {value!r} is not a number") from None
    if not out:
        raise HRankError("rates string is empty; expected PATTERN=RATE[,PATTERN=RATE...]")
    return out


# --------------------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------------------

def _match(pattern: str, channels: Mapping[str, int]) -> list[str]:
    return [pattern] if pattern in channels else [n for n in channels if fnmatch.fnmatchcase(n, pattern)]


def _resolve_model(model_or_name: nn.Module | str) -> nn.Module:
    return models.create(model_or_name) if isinstance(model_or_name, str) else model_or_name


def _model_label(model: nn.Module) -> str:
    return getattr(model, "hrank_arch", None) or type(model).__name__


def _check_rate(rate: Any, conv: str, channels: int, where: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise HRankError(f"rate {rate!r} {where} is not a number")
    rate = float(rate)
    if not math.isfinite(rate) or rate < 0 or rate > 1:
        raise HRankError(f"rate {rate!r} {where} is outside [0, 1) (rates are fractions of filters pruned)")
    if num_pruned(rate, channels) >= channels:
        raise HRankError(f"rate {rate!r} {where} would remove all {channels} filters of {conv} "
                         f"(rates are fractions pruned, in [0, 1))")
    return rate


def _load_rates_file(path: str | os.PathLike) -> dict:
    return load_yaml_mapping(path, "rates file")[0]  # YAML is a superset of JSON


@dataclass(frozen=True)
class Spec:
    """Per-conv rates for one model, plus where they came from.

    ``rates`` maps conv names to the fraction of filters pruned. ``order`` is the model's HRank rate-entry
    order (entry i lists its convs) when it has one, so the spec can be written back as an HRank string.
    ``source`` records the inputs (the compress_rate string and/or the pattern mapping) for the plan JSON.
    ``exact``: convs named exactly (by name or an HRank entry) — a plan fails if one of them cannot be
    pruned, where a conv reached only by a pattern is skipped and reported. ``ignored``: convs matched by
    ignore patterns; they are not pruned, nor is any group they are coupled into.
    """

    rates: dict[str, float]
    arch: str | None = None
    order: tuple[tuple[str, ...], ...] | None = None
    source: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    exact: frozenset[str] = frozenset()
    ignored: frozenset[str] = frozenset()

    # -- construction ------------------------------------------------------------------------------------
    @staticmethod
    def from_string(model: nn.Module | str, text: str) -> Spec:
        """One rate per HRank rate entry of a registered model (official order, official quirks)."""
        model = _resolve_model(model)
        arch = getattr(model, "hrank_arch", None)
        if arch is None:
            raise HRankError("an HRank compress_rate string needs a registered model (its rate-entry order); "
                             "give rates by layer name instead (e.g. --rates 'layer1.*.conv1=0.5')")
        entries = models.rate_entries(model)
        values = parse_rates(text, max_entries=len(entries))
        if len(values) != len(entries):
            raise HRankError(f"compress_rate has {len(values)} entries but {arch} expects {len(entries)} "
                             f"(one per rate entry; see `hrank info --model {arch}` for the order)")
        channels = conv_names(model)
        fixed = models.get_spec(arch).fixed_zero_entries
        rates: dict[str, float] = {}
        notes = []
        for i, (value, convs) in enumerate(zip(values, entries, strict=True)):
            if i in fixed:
                if value != 0:
                    notes.append(f"entry {i + 1} ({', '.join(convs)}) is forced to 0 as in the official code "
                                 f"(was {value!r})")
                value = 0.0
            for conv in convs:
                rates[conv] = _check_rate(value, conv, channels[conv], f"at entry {i + 1} ({conv})")
        return Spec(rates, arch, tuple(entries), {"compress_rate": text}, tuple(notes), frozenset(rates))

    @staticmethod
    def from_mapping(model: nn.Module | str, mapping: Mapping[str, float], *, base: Spec | None = None,
                     ignore: Sequence[str] = ()) -> Spec:
        """Rates by conv name or glob pattern (``fnmatch``: ``*`` also matches dots); later items win.

        With ``base``, the mapping overrides that spec's rates (e.g. an HRank string plus a few fixes).
        Every pattern must match at least one conv of the model. ``ignore``: patterns of convs to leave
        alone (see :meth:`without`).
        """
        model = _resolve_model(model)
        channels = conv_names(model)
        rates = dict(base.rates) if base is not None else {}
        exact = set(base.exact) if base is not None else set()
        for pattern, rate in mapping.items():
            if not isinstance(pattern, str) or not pattern:
                raise HRankError(f"layer pattern {pattern!r} must be a non-empty string")
            matched = _match(pattern, channels)
            if not matched:
                what = "pattern" if any(c in pattern for c in "*?[") else "layer name"
                raise HRankError(f"{what} {pattern!r} matches no Conv2d or ConvTranspose2d of "
                                 f"{_model_label(model)} (see `hrank info --model ...` for layer names)")
            if pattern in channels:
                exact.add(pattern)
            for conv in matched:
                rates[conv] = _check_rate(rate, conv, channels[conv], f"for {pattern!r} ({conv})")
        arch = getattr(model, "hrank_arch", None)
        order = tuple(models.rate_entries(model)) if arch is not None else None
        source = dict(base.source) if base is not None else {}
        source["rates"] = {**source.get("rates", {}), **{k: float(v) for k, v in mapping.items()}}
        spec = Spec(rates, arch, order, source, base.notes if base is not None else (), frozenset(exact),
                    base.ignored if base is not None else frozenset())
        return spec.without(model, ignore) if ignore else spec

    def without(self, model: nn.Module | str, ignore: Sequence[str]) -> Spec:
        """This spec with the convs matching ``ignore`` (names or glob patterns) left alone: not rated, and
        every coupled group containing one of them unpruned (Torch-Pruning's ``ignored_layers``)."""
        if isinstance(ignore, str):
            ignore = [p.strip() for p in ignore.split(",") if p.strip()]
        model = _resolve_model(model)
        channels = conv_names(model)
        ignored = set(self.ignored)
        for pattern in ignore:
            if not isinstance(pattern, str) or not pattern:
                raise HRankError(f"ignore pattern {pattern!r} must be a non-empty string")
            matched = _match(pattern, channels)
            if not matched:
                raise HRankError(f"ignore pattern {pattern!r} matches no conv of {_model_label(model)}")
            ignored.update(matched)
        source = dict(self.source)
        source["ignore"] = list(dict.fromkeys([*source.get("ignore", []), *ignore]))
        rates = {c: r for c, r in self.rates.items() if c not in ignored}
        return Spec(rates, self.arch, self.order, source, self.notes, frozenset(self.exact - ignored),
                    frozenset(ignored))

    @staticmethod
    def from_file(model: nn.Module | str, path: str | os.PathLike, *, base: Spec | None = None) -> Spec:
        """A YAML/JSON file: either ``{pattern: rate, ...}`` or ``{compress_rate: "...", rates: {...}}``.

        The file's rates override ``base``; a file with a compress_rate cannot also have a ``base``.
        """
        data = _load_rates_file(path)
        if "compress_rate" in data or "rates" in data:
            unknown = set(data) - {"compress_rate", "rates"}
            if unknown:
                raise HRankError(f"rates file {path}: unknown keys {sorted(unknown)} "
                                 f"(expected compress_rate and/or rates)")
            spec = base
            if data.get("compress_rate") is not None:
                if base is not None:
                    raise HRankError(f"rates file {path} has a compress_rate, and one was given already; give it once")
                spec = Spec.from_string(model, str(data["compress_rate"]))
            mapping = data.get("rates") or {}
            if not isinstance(mapping, dict):
                raise HRankError(f"rates file {path}: 'rates' must be a mapping of PATTERN: RATE")
            if mapping:
                spec = Spec.from_mapping(model, mapping, base=spec)
            if spec is None:
                raise HRankError(f"rates file {path} gives no rates")
            return spec
        return Spec.from_mapping(model, data, base=base)

    @staticmethod
    def from_any(model: nn.Module | str, spec: Spec | str | Mapping[str, float]) -> Spec:
        """A Spec as is, an HRank string, or a mapping of patterns to rates."""
        if isinstance(spec, Spec):
            return spec
        if isinstance(spec, str):
            return Spec.from_string(model, spec)
        if isinstance(spec, Mapping):
            return Spec.from_mapping(model, spec)
        raise HRankError(f"cannot make a spec from {type(spec).__name__}")

    # -- output ---------------------------------------------------------------------------------------------
    def pruned_filters(self, model: nn.Module) -> dict[str, int]:
        """``int(rate * C)`` per conv of the unpruned ``model``: the official counter's per-conv semantics."""
        channels = conv_names(model)
        return {conv: num_pruned(rate, channels[conv]) for conv, rate in self.rates.items() if conv in channels}

    def official_counter_pruned(self, model: nn.Module) -> dict[str, int] | None:
        """The same as the official FLOPs counter would read the rates, where it differs (GoogLeNet c4)."""
        remap = OFFICIAL_COUNTER_ENTRY_REMAP.get(self.arch or "")
        if not remap or self.order is None:
            return None
        counted = dict(self.rates)
        for pruned_entry, counted_entry in remap.items():
            rate = self.rates.get(self.order[counted_entry][0], 0.0)
            for conv in self.order[pruned_entry]:
                counted[conv] = rate
        channels = conv_names(model)
        return {conv: num_pruned(rate, channels[conv]) for conv, rate in counted.items() if conv in channels}

    def entry_rates(self) -> list[float]:
        """One rate per HRank entry; an error when the model has no order or an entry's convs disagree."""
        if self.order is None:
            raise HRankError("this spec's model has no HRank rate-entry order")
        out = []
        for i, convs in enumerate(self.order):
            values = {self.rates.get(c, 0.0) for c in convs}
            if len(values) > 1:
                raise HRankError(f"entry {i + 1} ({', '.join(convs)}) has different rates per conv; "
                                 f"not expressible as an HRank string")
            out.append(values.pop())
        return out

    def to_hrank_string(self) -> str:
        """The rates as HRank's list syntax, run-length encoded: ``[0.1]+[0.6]*35+[0.0, 0.5]*18+...``."""
        return encode_rates(self.entry_rates())

    def to_json(self) -> dict:
        """Plain JSON: arch, where the rates came from, the resolved per-conv rates, exact and ignored convs."""
        d = {"arch": self.arch, "source": self.source, "notes": list(self.notes), "rates": dict(self.rates)}
        if self.exact != frozenset(self.rates):
            d["exact"] = sorted(self.exact)
        if self.ignored:
            d["ignored"] = sorted(self.ignored)
        return d

    @staticmethod
    def from_json(d: Mapping[str, Any], model: nn.Module | str | None = None) -> Spec:
        """Rebuild from :meth:`to_json` (the rate-entry order is recovered from the registry)."""
        arch = d.get("arch")
        order = None
        if arch is not None:
            order = tuple(models.rate_entries(model if model is not None else arch))
        rates = {str(k): float(v) for k, v in d["rates"].items()}
        exact = frozenset(str(c) for c in d["exact"]) if "exact" in d else frozenset(rates)
        return Spec(rates, arch, order, dict(d.get("source") or {}), tuple(d.get("notes") or ()), exact,
                    frozenset(str(c) for c in d.get("ignored") or ()))
