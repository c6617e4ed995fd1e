"""Which packages the GPU machine lacks for bench/gpu.py: the list `make gpu-wheels` downloads.

    python bench/gpu_deps.py     # prints {"wheels": {name: version}, "runs": N} (a few minutes)

The GPU machine has torch, accelerate, transformers, numpy and safetensors, and so everything
those require (their Requires-Dist, followed recursively, as installed here). This script builds
that machine's view here: a folder of links to just those distributions' files, run with
`python -S` (no site-packages) and the repo on PYTHONPATH. It runs the benchmark (tiny model, CPU:
the same imports as on the GPU, where the CUDA-only paths import nothing but torch's), reads which
module or distribution was missing from the errors, adds that distribution, and runs again until
nothing is missing. Optional imports that libraries try and skip (boto3, dill, tensorboard...)
stay out: only what the benchmark cannot run without is listed, with the versions installed here
(the ones the tests ran with). Each distribution's declared requirements outside the machine's
closure come along (wheels are installed with --no-deps).
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ON_THE_GPU_MACHINE = ("torch", "accelerate", "transformers", "numpy", "safetensors")
OURS = ("shards", "precompute", "train")  # the repo's packages: on PYTHONPATH there, not wheels
MISSING = (re.compile(r"No module named '([^'.]+)"),
           re.compile(r"The '([A-Za-z0-9_.\-]+)[^']*' distribution was not found"))


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots) -> set[str]:
    """Normalised names of the distributions `roots` require, recursively, as installed here."""
    from packaging.requirements import Requirement

    seen, todo = set(), [_norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_norm(req.name))
    return seen


def link_site(site: Path, dists: set[str]) -> None:
    """Links in `site` to the top-level files of each distribution (packages, modules, dist-info)."""
    for name in dists:
        dist = metadata.distribution(name)
        base = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or []}:
            src, dst = base / top, site / top
            if src.exists() and not dst.exists() and top not in ("..", "__pycache__") and not top.endswith(".pth"):
                dst.symlink_to(src)


def run_bench(dists: set[str]) -> str:
    """stderr + stdout of the tiny CPU benchmark with only `dists` importable."""
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp, "site")
        site.mkdir()
        link_site(site, dists)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), OMP_NUM_THREADS="1")
        proc = subprocess.run(
            [sys.executable, "-S", str(REPO / "bench" / "gpu.py"), "--device", "cpu", "--model", "tiny",
             "--resolution", "64", "--batches", "2", "--steps", "1", "--warmup", "1", "--variants", "reference,eager",
             "--precompute-n", "4", "--loader-samples", "32", "--json", str(Path(tmp, "out.json"))],
            env=env, capture_output=True, text=True, cwd=tmp)
        return proc.stdout + proc.stderr + ("" if proc.returncode == 0 else f"\nexit status {proc.returncode}")


def main() -> None:
    have = closure(ON_THE_GPU_MACHINE)
    owner = {module: [_norm(d) for d in ds] for module, ds in metadata.packages_distributions().items()}
    added: set[str] = set()
    runs = 0
    while True:
        runs += 1
        out = run_bench(have | added)
        names = {m.group(1) for pattern in MISSING for m in pattern.finditer(out)} - set(OURS)
        new = set()
        for name in names:
            dists = owner.get(name) or [_norm(name)]
            new |= {d for d in dists if d not in have | added and d != "sdxl-adapter-cache"}
        if not new:
            if "exit status" in out or "Traceback" in out:
                sys.exit(f"bench/gpu.py fails for another reason than a missing package:\n{out[-4000:]}")
            break
        print(f"run {runs}: missing {sorted(new)}", file=sys.stderr)
        # A missing distribution brings its own requirements outside the machine's closure.
        added |= new | set().union(*(closure([d]) for d in new)) - have
    wheels = {d: metadata.version(d) for d in sorted(added)}
    print(json.dumps({"wheels": wheels, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
