"""What every benchmark shares: provenance, the JSON writer, medians, plots."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch

FIGURES = Path(os.environ.get("MINIDEPLOY_FIGURES", Path(__file__).resolve().parents[2] / "figures"))


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    """HEAD of the checkout (-dirty if tracked files changed); MINIDEPLOY_GIT_COMMIT overrides
    it for copies of the tree without their .git, such as a remote GPU machine's."""
    if os.environ.get("MINIDEPLOY_GIT_COMMIT"):
        return os.environ["MINIDEPLOY_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def provenance(device: torch.device | str) -> dict:
    import transformers

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m",
                                                    _module_name()] + sys.argv[1:]),
    }


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec else Path(sys.argv[0]).stem


def summarize(samples: list[float]) -> dict:
    """Median and spread of raw timings (seconds)."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "n": len(samples)}


def write_result(name: str, result: dict, device: torch.device | str) -> Path:
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / f"{name}.json"
    # Provenance first, at the top level: anyone opening the file sees where it came from.
    path.write_text(json.dumps({**provenance(device), **result}, indent=2) + "\n")
    return path


def load_result(name: str) -> dict:
    return json.loads((FIGURES / f"{name}.json").read_text())


def bench_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The parser of `python -m minideploy.bench.NAME`: its --help shows the module docstring as written."""
    return argparse.ArgumentParser(prog=f"python -m minideploy.bench.{name}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def save_figure(fig, path: Path, close: bool = True) -> Path:
    """Every benchmark's plot file: tight layout, 120 dpi; closed unless a notebook still shows it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    if close:
        plt.close(fig)
    return path


def bar_plot(path: Path, labels: list[str], values: list[float], ylabel: str, title: str) -> Path:
    import matplotlib.pyplot as plt  # headless machines get the Agg backend by default

    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(values)), 3.5))
    bars = ax.bar(labels, values, color=["#999999"] + ["#1f77b4"] * (len(values) - 1))
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylim(top=1.12 * max(values))  # room for the labels
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def device_tag(device: torch.device | str) -> str:
    """Short name for file names: 'cpu', a table tag ('h100', 'a100', ...) or the GPU's name."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    import re

    from ..roofline import published_spec

    name = torch.cuda.get_device_name(device)
    spec = published_spec(name)
    if spec is not None:
        return spec.tag
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")


def roofline_plot(path: Path | None, roofs: list[dict], points: list[dict], title: str, ax=None):
    """Log-log roofline: each roof a line, measured points coloured by `group`.

    roofs: dicts with label, peak_flops (FLOP/s), bandwidth (bytes/s) and optional
    dashed=True (published numbers). points: dicts with group, intensity (FLOP/byte),
    flops_per_s and optional batch (printed beside the first group's points).
    Saves to `path` if given; draws on `ax` if given (a notebook cell); returns the axes.
    """
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    peak = max(r["peak_flops"] for r in roofs)
    scale, unit = (1e12, "TFLOP/s") if peak >= 1e12 else (1e9, "GFLOP/s")
    xs = [p["intensity"] for p in points] + [r["peak_flops"] / r["bandwidth"] for r in roofs]
    grid = np.logspace(np.log10(min(xs) / 2), np.log10(max(xs) * 4), 400)
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for roof in roofs:
        ridge = roof["peak_flops"] / roof["bandwidth"]
        bw = roof["bandwidth"] / 1e9
        label = (f"{roof['label']}: {roof['peak_flops'] / scale:.4g} {unit}, "
                 f"{bw:.4g} GB/s, ridge {ridge:.3g} FLOP/B")
        ax.plot(grid, np.minimum(roof["peak_flops"], grid * roof["bandwidth"]) / scale,
                linestyle="--" if roof.get("dashed") else "-",
                color="#888888" if roof.get("dashed") else "black", linewidth=1.5, label=label)
    groups = list(dict.fromkeys(p["group"] for p in points))
    for i, group in enumerate(groups):
        mine = sorted((p for p in points if p["group"] == group), key=lambda p: p["intensity"])
        ax.plot([p["intensity"] for p in mine], [p["flops_per_s"] / scale for p in mine],
                marker="o", markersize=4, linewidth=1, color=f"C{i}", label=group)
        if i == 0:
            for p in mine:
                if "batch" in p:
                    ax.annotate(str(p["batch"]), (p["intensity"], p["flops_per_s"] / scale),
                                textcoords="offset points", xytext=(3, -11), fontsize=7, color="C0")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel(f"achieved {unit}")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    if path is not None:  # a figure made here is freed; a notebook's axes stay to be shown
        save_figure(ax.figure, path, close=fig is not None)
    return ax
