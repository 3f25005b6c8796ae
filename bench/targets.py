"""The issues' performance targets, checked against one benchmark run's results.

    python bench/targets.py RESULTS_DIR

reads ``RESULTS_DIR/<suite>.csv`` (and the copy bandwidth from ``<suite>.md``), as
``bench/run.py --out`` and ``bench/gpu_check.sh`` write them, and writes
``RESULTS_DIR/targets.md``: for each target and each kernel backend, whether every row measured
meets it, the worst row, and the rows not measured. ``gpu_check.sh`` runs it after the
benchmarks. The targets are those the issues set on an H100 (issues 4, 5 and 6); on another GPU
the table says how far from them that GPU's run is, and on a CPU it has no kernel rows.

A backward has no row of its own: its share of the copy bandwidth is derived from the fwd and
fwd+bwd rows of one case, (bytes of fwd+bwd - bytes of fwd) / (time of fwd+bwd - time of fwd),
each row's bytes being its GB/s times its time (the bytes that must move, as its script counts
them).
"""

from __future__ import annotations

import csv
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

# the rows a target compares kernels against ("copy": PyTorch copying the case's inputs, the
# same bytes at the same size: bench/common.py's copy_of_inputs)
BASELINES = ("eager", "compile", "sdpa core", "copy")
# and rows named "<kernel> cast-first": a kernel behind the cast to float32 that autocast used
# to need, kept in the adaln suite to show what the mixed-precision kernels save
BASELINE_SUFFIXES = (" cast-first",)


@dataclass(frozen=True)
class Target:
    issue: int
    what: str
    suite: str
    benches: tuple[str, ...]  # the rows' bench column (a trailing "*": any bench so starting)
    metric: str  # of_limit, vs_eager, vs_compile, or bwd_share (derived, see the docstring)
    at_least: float
    dtype: str | None = None  # only rows of this dtype

    def takes(self, row: dict) -> bool:
        bench = row["bench"]
        named = any(
            bench.startswith(b[:-1]) if b.endswith("*") else bench == b for b in self.benches
        )
        return named and (self.dtype is None or row["dtype"] == self.dtype)


FWD = ("adaln_modulate fwd", "gated_adaln fwd", "gated_adaln autocast fwd")
GATED = ("gated_adaln fwd", "gated_adaln fwd+bwd", "gated_adaln autocast fwd",
         "gated_adaln autocast fwd+bwd")  # fmt: skip
LAYOUT = ("patchify fwd", "patchify fwd+bwd", "unpatchify fwd", "unpatchify fwd+bwd")
FUSED = ("patch_embed fwd", "patch_embed fwd+bwd", "final_layer fwd", "final_layer fwd+bwd")
LAYER = ("downsampled_attention fwd", "downsampled_attention fwd+bwd")

# fmt: off
TARGETS = (
    Target(4, "adaln forward: >= 85 % of the copy bandwidth", "adaln", FWD, "of_limit", 0.85),
    Target(4, "adaln backward: >= 70 % of the copy bandwidth", "adaln",
           tuple(b.removesuffix(" fwd") for b in FWD), "bwd_share", 0.70),
    Target(4, "gated_adaln (the block step): >= 3x eager", "adaln", GATED, "vs_eager", 3.0),
    Target(4, "gated_adaln (the block step): >= 1.2x torch.compile", "adaln", GATED,
           "vs_compile", 1.2),
    Target(5, "patchify / unpatchify: >= 85 % of the copy bandwidth", "patchify", LAYOUT,
           "of_limit", 0.85),
    Target(5, "patch_embed, final_layer: >= 1.5x eager", "patchify", FUSED, "vs_eager", 1.5),
    Target(5, "patch_embed, final_layer: >= 1.2x torch.compile", "patchify", FUSED,
           "vs_compile", 1.2),
    Target(6, "downsampled_attention layer, bf16: >= 2x eager", "downsampled_attention", LAYER,
           "vs_eager", 2.0, "bfloat16"),
    Target(6, "downsampled_attention layer, bf16: >= 1.3x torch.compile",
           "downsampled_attention", LAYER, "vs_compile", 1.3, "bfloat16"),
    Target(6, "U-DiT-L with its tricks trains at least as fast as without them in eager "
              "(vs eager: the model without tricks)", "models",
           ("U-DiT-L train step*",), "vs_eager", 1.0),
)
# fmt: on


def _number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_suite(folder: Path, suite: str) -> tuple[list[dict], float]:
    """The suite's rows (numbers parsed; NaN where empty) and its copy bandwidth in GB/s (NaN
    when its .md is missing)."""
    path = folder / f"{suite}.csv"
    if not path.exists():
        return [], math.nan
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("time_us", "gbps", "of_limit", "vs_eager", "vs_compile"):
            row[key] = _number(row.get(key, ""))
    copy = math.nan
    md = folder / f"{suite}.md"
    if md.exists():
        found = re.search(r"copy bandwidth measured: ([\d.]+) GB/s", md.read_text())
        copy = float(found.group(1)) if found else math.nan
    return rows, copy


def is_kernel(backend: str) -> bool:
    """A row of something fastdit ships (cuda, triton, fastdit, ...), not a baseline."""
    return backend not in BASELINES and not backend.endswith(BASELINE_SUFFIXES)


def one_backend_a_row(rows: list[dict]) -> list[dict]:
    """The rows with a case not run (its backend column lists the variants it would have
    timed, its numbers NaN) as one row per variant, so that each counts as not measured."""
    out = []
    for r in rows:
        out += [dict(r, backend=b) for b in r["backend"].split(", ")]
    return out


def backward_rows(rows: list[dict], copy_gbps: float) -> list[dict]:
    """One derived row per (bench, shape, dtype, backend) with both a fwd and a fwd+bwd row:
    bench "<name>" (neither suffix), time_us the backward's, bwd_share its share of the copy
    bandwidth (NaN if either row is not measured, or the fwd+bwd row is not the slower)."""
    fwd = {(r["bench"].removesuffix(" fwd"), r["shape"], r["dtype"], r["backend"]): r
           for r in rows if r["bench"].endswith(" fwd")}  # fmt: skip
    out = []
    for r in rows:
        if not r["bench"].endswith(" fwd+bwd"):
            continue
        name = r["bench"].removesuffix(" fwd+bwd")
        f = fwd.get((name, r["shape"], r["dtype"], r["backend"]))
        if f is None:
            continue
        dt = r["time_us"] - f["time_us"]
        moved = r["gbps"] * r["time_us"] - f["gbps"] * f["time_us"]  # GB/s x us: kB
        share = moved / dt / copy_gbps if dt > 0 else math.nan
        out.append(dict(r, bench=name, bwd_share=share, time_us=dt))
    return out


@dataclass
class Verdict:
    target: Target
    backend: str
    measured: int
    met: int
    worst: dict | None
    not_measured: int

    @property
    def status(self) -> str:
        if not self.measured:
            return "not measured"
        if self.met < self.measured:
            return "MISSED"
        return "met, partly measured" if self.not_measured else "met"


def check(folder: Path) -> list[Verdict]:
    """Every target's verdict, per kernel backend found in its rows."""
    verdicts = []
    suites = {name: read_suite(folder, name) for name in {t.suite for t in TARGETS}}
    for target in TARGETS:
        rows, copy_gbps = suites[target.suite]
        rows = one_backend_a_row(rows)
        copies = {}  # the copy rows' shares, for a bandwidth target's worst rows
        if target.metric == "of_limit":
            copies = {(r["bench"], r["shape"], r["dtype"]): r["of_limit"]
                      for r in rows if r["backend"] == "copy"}  # fmt: skip
        if target.metric == "bwd_share":
            rows = backward_rows(rows, copy_gbps)
        rows = [r for r in rows if target.takes(r) and is_kernel(r["backend"])]
        backends = sorted({r["backend"] for r in rows})
        for backend in backends or ["(none)"]:
            mine = [r for r in rows if r["backend"] == backend]
            measured = [r for r in mine if not math.isnan(r[target.metric])]
            met = [r for r in measured if r[target.metric] >= target.at_least]
            worst = min(measured, key=lambda r: r[target.metric], default=None)
            if worst is not None:
                key = (worst["bench"], worst["shape"], worst["dtype"])
                worst = dict(worst, copy=copies.get(key, math.nan))
            verdicts.append(Verdict(target, backend, len(measured), len(met), worst,
                                    len(mine) - len(measured)))  # fmt: skip
    return verdicts


def _format(metric: str, value: float) -> str:
    return f"{value:.0%}" if metric in ("of_limit", "bwd_share") else f"{value:.2f}x"


def render(verdicts: list[Verdict], head: str = "") -> str:
    lines = ["# Targets", ""]
    if head:
        lines += [head, ""]
    lines += [
        "Each target against every row of its benches that a kernel backend measured "
        "(bench/targets.py; the rows: the suites' .md files). A row failed, or a case the "
        "suite's time did not reach, counts as not measured for each kernel it names. A "
        "worst row's \"copy of its inputs\": the share PyTorch copying that case's inputs "
        "reached, the same bytes at the same size (the copy bandwidth is measured on 256 MiB).",
        "",
        "| issue | target | backend | status | rows met | worst (value, case) | not measured |",
        "|---|---|---|---|---:|---|---:|",
    ]
    for v in verdicts:
        t = v.target
        worst = ""
        if v.worst is not None:
            r = v.worst
            worst = f"{_format(t.metric, r[t.metric])}: {r['bench']}, {r['shape']}, {r['dtype']}"
            if not math.isnan(r["copy"]):
                worst += f" (a copy of its inputs: {_format(t.metric, r['copy'])})"
        lines.append(
            f"| {t.issue} | {t.what} | {v.backend} | {v.status} | {v.met} / {v.measured} "
            f"| {worst} | {v.not_measured} |"
        )
    return "\n".join(lines) + "\n"


def _head(folder: Path) -> str:
    """The run's device, commit and versions, from the first suite's .md that has them."""
    for md in sorted(folder.glob("*.md")):
        keep = [line for line in md.read_text().splitlines()
                if re.match(r"- (date|commit|device|torch|cuda|triton):", line)]  # fmt: skip
        if keep:
            return "\n".join(keep)
    return ""


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    folder = Path(argv[0])
    if not folder.is_dir():
        print(f"{folder}: not a folder", file=sys.stderr)
        return 2
    text = render(check(folder), _head(folder))
    (folder / "targets.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
