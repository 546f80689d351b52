"""Draw docs/slides.md's figures of a real slide (a dev script; needs `make test-slide` first).

    python docs/real_slide_figures.py [--out docs]

* ``real_slide_tissue.png``: CMU-1-Small-Region (Aperio SVS, CC0) and a generated slide of the ``slides`` space
  (real IHC texture), each as its thumbnail, the foreground mask (Otsu on saturation, :mod:`ips_search.data.slides
  .tissue`) and the patches kept at ``min_foreground`` 0.5;
* ``real_slide_attention.png``: the patches IPS kept on the slide, and their attention scores, drawn by
  :func:`ips_search.report.slide_maps.plot_slide_attention`. With ``--trial DIR`` the model is that trial's (a
  trial of the ``slides`` search: trained on the generated cohort, read here at the resolution it was trained at;
  set ``IPS_SEARCH_CACHE`` to the search's cache so its cohort is not generated again); without, a small model
  trained a few epochs on crops of the slide (tests/real_slide.py: ``crop_cohort``, ``short_trial``; arbitrary
  labels, so that figure shows the drawing, not a finding).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fetched slide and the cohort cut from it, shared with the tests

from real_slide import SKIP_REASON, crop_cohort, find_slide, short_trial  # noqa: E402

from ips_search.config import DataConfig  # noqa: E402
from ips_search.data.slides import SlideDataset, make_source, tissue  # noqa: E402
from ips_search.data.slides.generate import MPP, make_layout, write_slide  # noqa: E402
from ips_search.data.slides.readers import open_slide  # noqa: E402
from ips_search.report.attention import compute_attention, load_trial_model  # noqa: E402
from ips_search.report.slide_maps import plot_slide_attention  # noqa: E402

THUMB = 8.0  # level-0 pixels per thumbnail pixel


def _tissue_row(axes, path: Path, title: str, level: int, patch: int, cache: Path) -> None:
    """Thumbnail, Otsu mask, kept patches of one slide into three axes."""
    reader = open_slide(path)
    try:
        image, scale = tissue.thumbnail(reader, THUMB)
    finally:
        reader.close()
    mask = tissue.foreground_mask(image)
    cfg = DataConfig(dataset="slides", patch_size=patch, level=level, min_foreground=0.5, cache_dir=str(cache))
    source = make_source(path, cfg)
    side = source.patch_size_level0 / scale
    axes[0].imshow(image)
    axes[0].set_title(title, fontsize=9)
    axes[1].imshow(mask, cmap="gray")
    axes[1].set_title(f"Otsu on saturation: {mask.mean():.0%} foreground", fontsize=9)
    axes[2].imshow(image)
    for x, y in source.coords / scale:
        axes[2].add_patch(Rectangle((x, y), side, side, fill=False, lw=0.8, ec="tab:green"))
    axes[2].set_title(f"{len(source)} patches of {patch} px at level {level} kept (>= 50% tissue)", fontsize=9)
    for ax in axes:
        ax.set_axis_off()


def tissue_figure(slide: Path, work: Path) -> Figure:
    generated = write_slide(work / "generated.tif", make_layout(2048, seed=3, tumour=True, texture="ihc"))
    fig = Figure(figsize=(11, 9.2), dpi=90, layout="constrained")
    axes = fig.subplots(2, 3)
    _tissue_row(axes[0], slide, "CMU-1-Small-Region (H&E, 20x, 2220 x 2967 px)", 0, 256, work)
    _tissue_row(axes[1], generated, "generated, texture ihc (2048 px, tumour)", 1, 64, work)
    return fig


def attention_figure(slide: Path, work: Path, epochs: int = 3, memory_size: int = 8) -> Figure:
    trial, _, _ = short_trial(crop_cohort(slide, work / "cohort"), work / "cache", epochs, memory_size)
    (on_slide,) = [m for m in compute_attention(trial, n_images=3) if Path(m.source.path) == slide]
    model = f"a small CNN trained {epochs} epochs on crops of this slide (arbitrary labels)"
    return _draw(slide, on_slide, "64 px, 0.5 um/px", model)


def trial_attention_figure(slide: Path, trial_dir: Path, work: Path) -> Figure:
    """``trial_dir``'s model (a trial of the generated ``slides`` space) over the real slide, read at the
    resolution the trial read its cohort at (the generated slides' level-0 mpp times the level's downsample)."""
    trial = load_trial_model(trial_dir)
    data = trial.config.data
    mpp = MPP * 2 ** (data.level or 0)
    cfg = DataConfig(
        dataset="slides", patch_size=data.patch_size, mpp=mpp, min_foreground=data.min_foreground, cache_dir=str(work)
    )
    source = make_source(slide, cfg)
    classes = trial.splits.test.classes
    one = SlideDataset([source], {"label": torch.zeros(1, dtype=torch.long)}, classes, data.n_chan)
    (on_slide,) = compute_attention(dataclasses.replace(trial, splits=SimpleNamespace(test=one)), n_images=1)
    model = (
        f"trial {trial.trial_id} of the slides search (trained on the generated cohort; "
        f"M={trial.model.cfg.memory_size}), answers {on_slide.prediction}"
    )
    return _draw(slide, on_slide, f"{data.patch_size} px, {mpp:g} um/px", model)


def _draw(slide: Path, on_slide, patches: str, model: str) -> Figure:
    source = on_slide.source
    title = (
        f"{slide.name}: the {len(on_slide.indices)} of {len(source)} tissue patches ({patches}) IPS kept, "
        f"by attention score; {model}"
    )
    return plot_slide_attention(
        slide, source.coords, on_slide.indices.numpy(), source.patch_size_level0, on_slide.scores.numpy(), 700, title
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the PNGs (default docs/)")
    parser.add_argument("--trial", type=Path, help="a slides-search trial folder whose model to draw (default: none)")
    args = parser.parse_args(argv)
    slide = find_slide()
    if slide is None:
        print(SKIP_REASON, file=sys.stderr)
        return 1
    torch.manual_seed(0)  # the same model, and figure, each run
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tissue_figure(slide, work).savefig(args.out / "real_slide_tissue.png", dpi=72)  # docs-sized files
        if args.trial:
            figure = trial_attention_figure(slide, args.trial, work)
        else:
            figure = attention_figure(slide, work)
        figure.savefig(args.out / "real_slide_attention.png", dpi=80)
    for name in ("real_slide_tissue.png", "real_slide_attention.png"):
        print(args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
