"""fastdit's benchmark suite: every op family and the end-to-end models, against eager PyTorch,
torch.compile and this machine's limits.

On a GPU the default is the full suite in bf16 (the DiT-XL/2 end-to-end forward at 256 px
included); --dtype picks other dtypes. On a CPU it is a small fp32 default that finishes in a
few minutes on 2 cores. Each backend that cannot run here gets one line saying why.

    python bench/run.py [--quick | --full] [--dtype bf16 ...] [--no-backward] [--out DIR]
                        [--only adaln,patchify,downsampled_attention,models,overhead] [--budget S]
                        [--warm-compiles I/N]

--budget gives each suite that many seconds: the cases that would start later are listed as
not run. Results are rewritten after every case, so a suite stopped from outside keeps what it
measured.

--warm-compiles I/N times nothing: it compiles the torch.compile baselines of shard I of N of
the cases (dealt by a hash of each case's name) into Inductor's on-disk caches, so that a timed
run with the same arguments afterwards loads them instead of compiling; bench/gpu_check.sh runs
N of these beside the build and the tests.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_adaln  # noqa: E402
import bench_downsampled_attention  # noqa: E402
import bench_models  # noqa: E402
import bench_overhead  # noqa: E402
import bench_patchify  # noqa: E402
import common  # noqa: E402

import fastdit  # noqa: E402

SUITES = {
    "adaln": bench_adaln,
    "patchify": bench_patchify,
    "downsampled_attention": bench_downsampled_attention,
    "models": bench_models,
    "overhead": bench_overhead,
}


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--only", default=",".join(SUITES), help="comma-separated suites")
    args = p.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SUITES))
    if unknown:
        p.error(f"unknown suite(s) {unknown}; choose from {sorted(SUITES)}")

    print("backends here:")
    for family, row in fastdit.backends().items():
        for backend, status in row.items():
            state = "available" if status.available else f"cannot run here: {status.reason}"
            print(f"  {family:22s} {backend:7s} {state}")
    ctx = common.context_from(args)
    for name in names:
        start = time.perf_counter()
        print(f"\n== {name} ==")
        ctx.start_suite(name, args.budget)
        rows = SUITES[name].run(ctx)
        common.report(rows, ctx, name, args.out)
        print(f"({name}: {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
