"""Mutation testing of hrank's core with mutmut 3 (``pip install -e ".[dev]"``), module by module.

Scope: the functions where a one-character bug gives a silently wrong model (docs/mutation.md): the spec's
rate rule and list parser, the rank math and its tolerance, plan selection/coupling and the option-A shortcut
pruner, the budget's cost model, the physical pruner, save/load. Each module runs in its own copy of the
repository (the working tree is never touched) with only its own fast tests selected, so a run fits a 2-core
machine:

    python bench/mutation.py                      # every module (about 1 h on 2 cores, 1 worker)
    python bench/mutation.py --modules spec ranks --max-children 2 --show

It prints, per module, killed / timeout / survived / no-tests / known-equivalent counts and the score
``(killed + timeout) / (total - equivalent)``, lists every survivor that is not in ``EQUIVALENT`` (``--show``
adds its diff), and writes the numbers as JSON (``--json``). Exit status 1 when a module scores below
``--min-score`` (default 0.9). Not part of the regular test run: it is run by hand or on a schedule.

Error-message text is not mutated (``do_not_mutate_patterns``: lines holding ``raise`` or ``HRankError(``): a
wrong message never makes a wrong model, and the conditions that raise are still mutated. Mutant names are
``module.x_function__mutmut_N`` (methods ``module.xǁClassǁmethod__mutmut_N``); the numbering follows the
source, so after an edit of a scoped function the names in ``EQUIVALENT`` must be re-checked.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SKIP = shutil.ignore_patterns(".git", "mutants", "__pycache__", ".hypothesis", "*.egg-info", ".pytest_cache",
                               ".ruff_cache")
_SKIP_TOP = {".devdata", "runs", "data", ".venv", "venv", "build", "dist"}  # local data and outputs, top level only


def _ignore(folder: str, names: list[str]) -> set[str]:
    skipped = set(_SKIP(folder, names))
    return skipped | (_SKIP_TOP & set(names)) if Path(folder) == ROOT else skipped
# Lines whose statements are not mutated: error messages (see the module docstring).
DO_NOT_MUTATE = ["raise ", r"HRankError\("]


@dataclass(frozen=True)
class Module:
    """One mutation run: the file, the functions mutated (mutmut name globs) and the tests selected."""

    path: str
    functions: tuple[str, ...]
    tests: tuple[str, ...]

    @property
    def dotted(self) -> str:
        return self.path.removesuffix(".py").replace("/", ".")

    def globs(self) -> list[str]:
        return [f"{self.dotted}.{f}__mutmut_*" for f in self.functions]

    def selected(self, names: list[str] | None) -> list[str]:
        """The mutmut name arguments: every scoped mutant, or only ``names`` (globs) of this module."""
        if not names:
            return self.globs()
        return [n for n in names if n.startswith(self.dotted + ".")]


MODULES: dict[str, Module] = {
    # the int(rate * C) rule, rate checks, the list-syntax parser's expansion, entry -> conv mapping
    "spec": Module("hrank/spec.py", (
        "x_num_pruned", "x__check_rate", "x__match", "xǁ_Parserǁinteger", "xǁ_Parserǁbracket_list",
        "xǁ_Parserǁterm", "xǁ_Parserǁparse", "xǁSpecǁfrom_string", "xǁSpecǁpruned_filters",
    ), ("tests/test_spec.py", "tests/test_mut_spec.py")),
    # exact batched ranks: the Gram path, its tolerance, the reference, chunking
    "ranks": Module("hrank/ranks.py", (
        "x__gram_ranks", "x__svd_ranks", "x__pieces", "x__ranks_4d", "x_matrix_ranks",
    ), ("tests/test_ranks.py", "tests/test_mut_ranks.py", "-k", "matrix or mut")),
    # selection (rule, ties, blocks), width rules, group constraints, the option-A shortcut pruner
    "plan": Module("hrank/plan.py", (
        "x_select_kept", "x__select_for_group", "x__mean_rate", "xǁPlanGroupǁblock_counts",
        "x__conv_constraints", "xǁShortcutPrunerǁprune_out_channels", "xǁShortcutPrunerǁprune_in_channels",
    ), ("tests/test_plan.py", "tests/test_plan_general.py", "tests/test_mut_plan.py",
        "-k", "not official and not googlenet and not budget")),
    # the exact MACs/params cost model of a pruned network, step sizes, readable rates
    "budget": Module("hrank/budget.py", (
        "xǁ_CostModelǁ__init__", "xǁ_CostModelǁwidths", "xǁ_CostModelǁ__call__", "x__steps", "x_readable_rate",
    ), ("tests/test_budget.py", "tests/test_mut_budget.py", "-k",
        "readable or mut or (hits_target and coupled) or outside_the_registry")),
    # physical channel removal: plan indices -> current positions, grouped convs' input blocks
    "prune": Module("hrank/prune.py", (
        "x__apply_physical", "x__grouped_in_weight",
    ), ("tests/test_prune.py", "tests/test_plan_general.py", "tests/test_mut_prune.py",
        "-k", "not zeroed_filters and not official and not budget")),
    # save/load: the record, rebuilding from it, module versions
    "checkpoint": Module("hrank/checkpoint.py", (
        "x_state_metadata", "x__with_metadata", "x_load_state", "x_model_record", "x_build_from_record",
        "x_save", "x_read_record", "x_load",
    ), ("tests/test_checkpoint_meta.py", "tests/test_prune.py", "tests/test_mut_checkpoint.py",
        "-k", "save or load or record or meta or version or mut")),
}

# Mutants that cannot change any result (killed by no test, by construction). Each has its reason here and in
# docs/mutation.md. Names are valid for the source as of the date recorded there.
EQUIVALENT: dict[str, str] = {
    **{f"hrank.plan.xǁShortcutPrunerǁprune_{side}_channels__mutmut_{n}": "zip(strict=...) dropped, False or "
       "None over src/dst: set_mapping and __init__ keep them the same length" for side in ("out", "in")
       for n in (11, 14, 15)},
    "hrank.plan.x__conv_constraints__mutmut_22": "width / groups instead of //: Conv2d requires groups to divide "
    "both widths, so the quotient is an exact integer",
    **{f"hrank.plan.x__conv_constraints__mutmut_{n}": "the 'writes' text of the one-per-group reason: unreachable, "
       "out_channels == groups is either refused earlier or depthwise" for n in (26, 28, 29)},
    "hrank.plan.x_select_kept__mutmut_11": 'argsort kind="STABLE": NumPy reads the kind case-insensitively',
    "hrank.plan.xǁPlanGroupǁblock_counts__mutmut_2": "channels / blocks instead of //: the only caller checks "
    "channels % blocks == 0 first, so the size is an exact integer",
    **{f"hrank.spec.xǁSpecǁfrom_string__mutmut_{n}": "zip(strict=...) dropped or False: the lengths were "
       "checked equal two lines above" for n in (29, 32, 33)},
    "hrank.spec.xǁSpecǁfrom_string__mutmut_41": "the joiner of a forced-zero entry's convs: the only such entry "
    "(VGG's 13th) has one conv",
    **{f"hrank.ranks.x_{f}__mutmut_{n}": "NaN/inf maps replaced unconditionally, or by 1.0 instead of 0.0: "
       "the replacement is the identity on finite maps and the replaced maps' ranks are overwritten with -1"
       for f, ns in (("_gram_ranks", (21, 29)), ("_svd_ranks", (8, 16))) for n in ns},
    **{f"hrank.ranks.x__gram_ranks__mutmut_{n}": "the Cholesky certificate never passes or is bypassed (tau_U / "
       "f2, info None, & -> |): every nonzero map gets eigvalsh, which counts the same eigenvalues against tau <= "
       "tau_U (the certificate holds only when all exceed tau_U); all-zero maps have only 0 eigenvalues: rank 0"
       for n in (106, 107, 112)},
    "hrank.ranks.x__gram_ranks__mutmut_115": "lines >= 0 also redoes all-zero maps: their Gram matrix is 0, no "
    "eigenvalue is > 0, rank 0 as before",
    "hrank.ranks.x__gram_ranks__mutmut_48": "rows <= cols picks the rows side when rows == cols: both Gram matrices "
    "have the spectrum sigma_i^2 plus lifted zero lines, so the certificate and the count are the same",
    "hrank.ranks.x__gram_ranks__mutmut_53": "transpose(2, 2) keeps the rows side: if rows > cols the nonzero block "
    "has rank <= cols < rows, Cholesky fails by a margin tau_U and eigvalsh counts the rank; else as before",
    "hrank.ranks.x__gram_ranks__mutmut_60": "h <= w instead of h < w in the elif: h == w took the first branch",
    **{f"hrank.ranks.x__gram_ranks__mutmut_{n}": "which device solves eigvalsh (host or GPU) for a CUDA Gram: "
       "is_cuda or k > 32, shape[1] / [-2] (the Gram is square), k >= 32: the same float64 eigenvalues; on CPU "
       "`is_cuda and` is never true" for n in (119, 120, 121, 122)},
    "hrank.ranks.x__gram_ranks__mutmut_124": "host eigenvalues .to(None) instead of back to the GPU: a CUDA-only "
    "branch (a CPU-only run; test_mut_cuda_ranks_equal_the_reference runs it on a GPU)",
    **{n: "the number of pieces (min_pieces, 2 per pool worker: dropped, 1 or 2 or 3 per worker, b / c, without "
       "a pool): any per_piece >= 1 gives the same row-major partition into whole maps within chunk_elems, so the "
       "same ranks; only how the work spreads over the workers changes"
       for n in ("hrank.ranks.x__pieces__mutmut_15", "hrank.ranks.x__pieces__mutmut_16",
                 "hrank.ranks.x__pieces__mutmut_21", *(f"hrank.ranks.x__ranks_4d__mutmut_{k}"
                                                      for k in (25, 26, 27, 28, 29, 30)))},
    "hrank.ranks.x__pieces__mutmut_22": "per_piece > C at per_piece == C: maps[i, 0:C] instead of maps[i:i + 1], "
    "one piece per image with the same maps in the same order (acts are elementwise)",
    "hrank.ranks.x__ranks_4d__mutmut_3": "maps.shape[+2:] on 4-D maps is shape[-2:]",
    "hrank.ranks.x_matrix_ranks__mutmut_26": "4-D maps also reshaped to (1, B*C, H, W): the same maps in the same "
    "row-major order, viewed back as (B, C); at most a one-time copy of a non-contiguous input",
    **{f"hrank.ranks.x_matrix_ranks__mutmut_{n}": "workers None or 2 instead of 1 without a pool: _ranks_4d reads "
       "workers only when a pool is given" for n in (69, 75)},
    **{n: "a count clipped to max_entries + 2 instead of + 1: it only enters `> max_entries` (every list has "
       "at least one value), where both are over" for n in ("hrank.spec.xǁ_Parserǁinteger__mutmut_22",
                                                             "hrank.spec.xǁ_Parserǁinteger__mutmut_29",
                                                             "hrank.spec.xǁ_Parserǁterm__mutmut_22")},
    "hrank.spec.xǁ_Parserǁinteger__mutmut_18": 'lstrip("XX0XX") instead of lstrip("0") on a string of digits only',
    "hrank.checkpoint.x_build_from_record__mutmut_12": 'record.get("version", 1) instead of 0: a missing version '
    "is not newer than VERSION (1) either way",
    "hrank.checkpoint.x_load_state__mutmut_25": "strict=True dropped: load_state_dict's strict defaults to True",
    **{f"hrank.checkpoint.x_model_record__mutmut_{n}": '.to(None or no device, copy=True) instead of .to("cpu"): '
       "the same copy where every tensor is on the CPU (a CPU-only run; killed by the CUDA test)" for n in (80, 82)},
    "hrank.budget.x_readable_rate__mutmut_6": "a 0-digit try first: for 0 < n < C its candidate is 1.0 (prunes all "
    "C), and an integer rate works only when n = m * C, where the 1-digit try returns the same m",
    **{f"hrank.budget.xǁ_CostModelǁwidths__mutmut_{n}": "zip(strict=...) dropped, False or None over "
       "self.layers and two lists built as [0] * len(self.layers)" for n in (27, 31, 32)},
    **{f"hrank.budget.xǁ_CostModelǁ__call____mutmut_{n}": "zip(strict=...) dropped, False or None over "
       "self.layers and self.widths(counts), one entry per layer" for n in (6, 9, 11)},
    **{n: "the depthwise flag lost: Torch-Pruning's depthwise pruner has prune_in_channels = prune_out_channels, so "
       "a depthwise conv never gets an input removal (r_in = 0) and (cin - 0) // groups == cin // groups"
       for n in ("hrank.budget.xǁ_CostModelǁ__call____mutmut_13", "hrank.budget.xǁ_CostModelǁ__init____mutmut_19",
                 "hrank.budget.xǁ_CostModelǁ__init____mutmut_20")},
    "hrank.budget.xǁ_CostModelǁ__init____mutmut_37": "parameters(recurse=None): None is falsy, as recurse=False",
    "hrank.budget.xǁ_CostModelǁ__init____mutmut_51": "channel [1] instead of [0] probes the group: only the lengths "
    "of the index lists are used, and every mapping (identity, concat, flatten, grouped) gives each channel as many",
    **{f"hrank.prune.x__grouped_in_weight__mutmut_{n}": "torch.tensor's dtype=torch.long dropped or None: it infers "
       "int64 from the int index lists, which are never empty (a plan keeps >= 1 channel, so no block loses every "
       "input)" for n in (17, 20)},
    **{f"hrank.prune.x__grouped_in_weight__mutmut_{n}": "the index tensor built without device=weight.device: the "
       "same tensor where every weight is on the CPU (a CPU-only run; killed by the CUDA test)" for n in (18, 21)},
}


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def prepare(module: Module, dest: Path) -> None:
    """A copy of the repository with a [tool.mutmut] section for this module (replacing any there)."""
    shutil.copytree(ROOT, dest, ignore=_ignore, symlinks=True)
    tests = [t for t in module.tests if t.startswith("-") or not t.startswith("tests/") or (dest / t).exists()]
    text = (dest / "pyproject.toml").read_text(encoding="utf-8")
    if "[tool.mutmut]" in text:  # keep the repository's section out: this run's settings win
        head, _, tail = text.partition("[tool.mutmut]")
        rest = tail.split("\n[", 1)
        text = head + ("[" + rest[1] if len(rest) > 1 else "")
    text += (
        "\n[tool.mutmut]\n"
        'source_paths = ["hrank"]\n'
        f"only_mutate = {_toml_list([module.path])}\n"
        f"do_not_mutate_patterns = {_toml_list(DO_NOT_MUTATE)}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider"]\n'
        'process_isolation = "forkserver"\n'
        # a mutant that loops (the parser's while loops) is a timeout after 3x the clean run + 10 s, not 15x
        "timeout_multiplier = 3.0\n"
        "timeout_constant = 10.0\n"
    )
    (dest / "pyproject.toml").write_text(text, encoding="utf-8")


def statuses(dest: Path, module: Module, names: list[str] | None) -> dict[str, str]:
    """mutant name -> mutmut status for this module's scoped (or selected) mutants."""
    from mutmut.stats import status_by_exit_code

    meta = json.loads((dest / "mutants" / (module.path + ".meta")).read_text(encoding="utf-8"))
    globs = module.selected(names)
    return {name: status_by_exit_code[code] for name, code in sorted(meta["exit_code_by_key"].items())
            if any(fnmatch.fnmatchcase(name, g) for g in globs)}


def run_module(name: str, module: Module, base: Path, max_children: int, show: bool,
               names: list[str] | None = None) -> dict:
    dest = base / name
    if dest.exists():
        shutil.rmtree(dest)
    prepare(module, dest)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    start = time.time()
    log = dest / "mutmut.log"
    with open(log, "w", encoding="utf-8") as out:
        rc = subprocess.call([sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children),
                              *module.selected(names)], cwd=dest, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    if rc != 0 or not (dest / "mutants" / (module.path + ".meta")).exists():
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"mutmut failed for {name} (exit {rc}); log {log}:\n{tail}")
    st = statuses(dest, module, names)
    counts: dict[str, int] = {}
    for s in st.values():
        counts[s] = counts.get(s, 0) + 1
    equivalent = sorted(n for n, s in st.items() if n in EQUIVALENT and s != "killed")
    detected = counts.get("killed", 0) + counts.get("timeout", 0)
    denominator = len(st) - len(equivalent)
    survivors = sorted(n for n, s in st.items() if s not in ("killed", "timeout") and n not in EQUIVALENT)
    result = {"module": name, "file": module.path, "total": len(st), "killed": counts.get("killed", 0),
              "timeout": counts.get("timeout", 0), "survived": counts.get("survived", 0),
              "no_tests": counts.get("no tests", 0), "equivalent": len(equivalent),
              "other": len(st) - sum(counts.get(k, 0) for k in ("killed", "timeout", "survived", "no tests")),
              "score": detected / denominator if denominator else 1.0, "seconds": round(seconds),
              "survivors": {n: st[n] for n in survivors}, "workdir": str(dest)}
    print(f"{name:<11} {module.path:<20} total {len(st):4d}  killed {result['killed']:4d}  timeout "
          f"{result['timeout']:3d}  survived {result['survived']:3d}  no-tests {result['no_tests']:3d}  "
          f"equivalent {len(equivalent):3d}  score {result['score']:.1%}  ({seconds:.0f} s)", flush=True)
    for n in survivors:
        print(f"    {st[n]:<9} {n}", flush=True)
        if show:
            diff = subprocess.run([sys.executable, "-m", "mutmut", "show", n], cwd=dest, env=env,
                                  capture_output=True, text=True).stdout
            print("        " + "\n        ".join(diff.strip().splitlines()[1:]), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", choices=sorted(MODULES), default=list(MODULES))
    parser.add_argument("--max-children", type=int, default=1, help="parallel mutant workers (default 1)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the per-module copies go (default: a new temporary folder, kept)")
    parser.add_argument("--show", action="store_true", help="print the diff of every survivor")
    parser.add_argument("--json", type=Path, default=None, help="write the per-module results here")
    parser.add_argument("--min-score", type=float, default=0.9)
    parser.add_argument("--mutants", nargs="+", default=None, metavar="NAME",
                        help="run only these mutant names (globs; e.g. the survivors of an earlier run)")
    parser.add_argument("--list", action="store_true", help="print the scoped functions and tests, run nothing")
    args = parser.parse_args(argv)
    if args.list:
        for name in args.modules:
            m = MODULES[name]
            print(f"{name}: {m.path}\n  functions: {', '.join(m.functions)}\n  tests: {' '.join(m.tests)}")
        return 0
    try:
        import mutmut  # noqa: F401
    except ImportError:
        raise SystemExit('mutmut is not installed: pip install -e ".[dev]"') from None
    base = args.workdir or Path(tempfile.mkdtemp(prefix="hrank-mutation-"))
    base.mkdir(parents=True, exist_ok=True)
    print(f"working copies in {base}", flush=True)
    modules = [n for n in args.modules if not args.mutants or MODULES[n].selected(args.mutants)]
    results = [run_module(n, MODULES[n], base, args.max_children, args.show, args.mutants) for n in modules]
    killed = sum(r["killed"] + r["timeout"] for r in results)
    denominator = sum(r["total"] - r["equivalent"] for r in results)
    total = killed / denominator if denominator else 1.0
    print(f"all modules: {killed}/{denominator} non-equivalent mutants killed = {total:.1%}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "score": total, "modules": results},
                                        indent=2), encoding="utf-8")
    return 0 if all(r["score"] >= args.min_score for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
