"""Attention maps of a trial's checkpoint: which M patches IPS keeps on a test image, and their scores.

The reference notebook's visualisation: the image, the M patches IPS selected out
of N, each coloured by its cross-attention score (averaged over heads and tasks).
The model is rebuilt from the trial's ``params.json`` and ``result.json`` and its
newest readable checkpoint is loaded with ``torch.load(weights_only=True)``:
tensors and plain values only, nothing is unpickled.

The report never loads TorchScript (it is code: loading a file runs it). A features trial whose ``params.json``
names a TorchScript encoder is drawn from its already extracted files; if they are missing, the map is skipped
with a note, and the file that only the trial's folder names is never run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ips_search.errors import ConfigError
from ips_search.experiment import CHECKPOINT_FILE, PARAMS_FILE, RESULT_FILE
from ips_search.report.load import Experiment, load_experiment
from ips_search.report.plots.style import literal_text
from ips_search.report.sources import read_json, read_json_lines
from ips_search.report.sources import sampled as sampled_params
from ips_search.report.tables import ranked


@dataclass
class AttentionMap:
    """One image and what IPS kept of it.

    ``image``: ``(C, H, W)`` in [0, 1]; ``indices``: the M kept patch indices
    (row-major over the patch grid); ``scores``: their attention scores;
    ``heatmap``: ``(H, W)``, each kept patch's score painted on its pixels (0 elsewhere).
    """

    image: torch.Tensor
    indices: torch.Tensor
    scores: torch.Tensor
    heatmap: torch.Tensor
    patch_size: int
    stride: int
    grid: tuple[int, int]
    index: int  # position in the split
    target: str
    prediction: str
    source: Any = None  # a whole slide (a lazy patch source, or a features file's SlideView): drawn over its thumbnail


@dataclass
class TrialModel:
    """A trial's model rebuilt from its folder, in eval mode on the CPU."""

    trial_id: str
    model: Any
    splits: Any
    config: Any
    checkpoint: Path
    epoch: int | None


def checkpoints(trial_dir: str | Path) -> list[Path]:
    """The trial's checkpoint files, newest first."""
    found = [p / CHECKPOINT_FILE for p in Path(trial_dir).glob("checkpoint_*") if (p / CHECKPOINT_FILE).is_file()]
    return sorted(found, key=lambda p: p.parent.name, reverse=True)


def best_trial_with_checkpoint(df: pd.DataFrame) -> pd.Series | None:
    """The best-ranked trial whose folder holds a checkpoint."""
    for _, row in ranked(df).iterrows():
        path = row.get("path")
        if isinstance(path, str) and path and checkpoints(path):
            return row
    return None


def load_trial_model(trial_dir: str | Path, device: str = "cpu") -> TrialModel:
    """Rebuild a trial's IPSNet from its folder and load its newest readable checkpoint.

    Raises ``FileNotFoundError`` / ``RuntimeError`` with a one-line reason when the
    folder has no config or no loadable checkpoint.
    """
    from ips_search.data import build_datasets
    from ips_search.extraction import resolve_data
    from ips_search.space import trial_config
    from ips_search.train import build_model

    trial_dir = Path(trial_dir)
    params = read_json(trial_dir / PARAMS_FILE)
    if "fixed" not in params:
        raise FileNotFoundError(f"{trial_dir} has no readable {PARAMS_FILE} with the trial's config")
    results = read_json_lines(trial_dir / RESULT_FILE)
    last = results[-1] if results else {}
    sampled = sampled_params(params)
    sampled.update({k: last[k] for k in ("memory_size", "iteration_size") if last.get(k) is not None})
    config = trial_config(params["fixed"], sampled)
    splits = build_datasets(resolve_data(config.data, progress=False, run_torchscript=False))
    model = build_model(config, splits, torch.device(device), warm_start=False)
    errors = []
    for path in checkpoints(trial_dir):
        try:
            state = torch.load(path, map_location=device, weights_only=True)
            model.load_state_dict(state["model"])
        except Exception as exc:  # noqa: BLE001 - half-written or corrupt: try the previous checkpoint
            errors.append(f"{path.parent.name}: {type(exc).__name__}")
            continue
        model.eval()
        trial_id = str(last.get("trial_id") or trial_dir.name)
        return TrialModel(trial_id, model, splits, config, path, state.get("epoch"))
    detail = f" ({'; '.join(errors)})" if errors else ""
    raise RuntimeError(f"{trial_dir.name} has no loadable checkpoint{detail}")


def _label(value: torch.Tensor, classes: list[str] | None) -> str:
    if value.dim() == 0:
        i = int(value)
        return classes[i] if classes and 0 <= i < len(classes) else str(i)
    on = torch.nonzero(value > 0.5).flatten().tolist()  # multi-label
    return ",".join(str(i) for i in on) or "-"


@torch.no_grad()
def compute_attention(trial: TrialModel, n_images: int = 4, split: str = "test") -> list[AttentionMap]:
    """Attention maps of the first ``n_images`` images of a split."""
    from ips_search.data import DATASETS, patch_map
    from ips_search.report.feature_views import FeatureViews

    model, dataset = trial.model, getattr(trial.splits, split)
    model.eval()
    stride = model.cfg.patch_stride or model.cfg.patch_size
    tasks = model.cfg.tasks
    classes = getattr(dataset, "classes", None)
    views = None
    if DATASETS[trial.config.data.dataset].features:  # embeddings: the pixels are the image's or slide's they came from
        views = FeatureViews(trial.config)
        classes = views.class_names(classes)
    maps = []
    for i in range(min(n_images, len(dataset))):
        patches, targets = dataset[i]
        lazy = not isinstance(patches, torch.Tensor)  # a slide: a patch source, read chunk by chunk
        batch = [patches] if lazy else patches.unsqueeze(0)  # (1, N, C, P, P)
        mem_patch, mem_idx = model.ips(batch)  # (1, M, C, P, P), (1, M)
        B, M = mem_idx.shape
        emb = model.encode(mem_patch.flatten(0, 1)).view(B, M, -1)
        scores = model.score(emb, mem_idx)[0].float()  # (M,)
        logits = model(mem_patch, mem_idx)
        logits = logits if isinstance(logits, dict) else {tasks[0].name: logits}
        task = tasks[0]
        z = logits[task.name][0]
        pred = (torch.sigmoid(z) > 0.5).float() if task.multi_label else z.argmax()
        view = views(dataset, i) if views is not None else None
        patch_size, source = model.cfg.patch_size, patches if lazy else None
        if view is not None and not hasattr(view, "image"):  # a slide view (or the coords alone)
            source, lazy = view, True
        if lazy:
            image = heatmap = torch.zeros(0)
            grid = (1, len(patches))
        else:
            if view is not None:  # features of an in-memory image: that image, on the grid they were cut with
                image, grid, patch_size, stride = view.image, view.grid, view.patch_size, view.stride
            else:
                image, grid = dataset.image(i), tuple(dataset.grid)
            values = torch.zeros(len(patches))
            values[mem_idx[0].cpu()] = scores.cpu()
            heatmap = patch_map(values, tuple(image.shape[-2:]), patch_size, stride)
        maps.append(
            AttentionMap(
                image=image,
                indices=mem_idx[0].cpu(),
                scores=scores.cpu(),
                heatmap=heatmap,
                patch_size=patch_size,
                stride=stride,
                grid=grid,
                index=i,
                target=_label(targets[task.name], classes),
                prediction=_label(pred, classes),
                source=source,
            )
        )
    return maps


def attention_maps(
    experiment: str | Path | Experiment, trial_id: str | None = None, n_images: int = 4, split: str = "test"
) -> tuple[TrialModel, list[AttentionMap]]:
    """The best trial's (or ``trial_id``'s) model and its attention maps on the first test images."""
    exp = experiment if isinstance(experiment, Experiment) else load_experiment(experiment)
    df = exp.trials
    if trial_id is not None:
        rows = df[df["trial_id"] == str(trial_id)] if not df.empty else df
        if rows.empty:
            raise KeyError(f"no trial {trial_id!r} in {exp.path}")
        row = rows.iloc[0]
    else:
        row = best_trial_with_checkpoint(df)
        if row is None:
            raise FileNotFoundError("no ranked trial has a checkpoint yet")
    path = row.get("path")
    if not isinstance(path, str) or not Path(path).is_dir():
        raise FileNotFoundError(f"trial {row['trial_id']} has no folder")
    trial = load_trial_model(path)
    trial.trial_id = str(row["trial_id"])
    return trial, compute_attention(trial, n_images, split)


def attention_or_note(
    experiment: str | Path | Experiment, n_images: int = 4, trial_id: str | None = None, split: str = "test"
) -> tuple[TrialModel | None, list[AttentionMap], str | None]:
    """:func:`attention_maps`, or ``(None, [], note)`` with a one-line reason when they can't be made.

    The report and its notebook both use this, so a trial whose data or model can't be
    rebuilt here (a folder dataset that moved, a checkpoint from an older model version)
    costs the attention maps only, with the same note in ``summary.md`` and in the notebook.
    """
    try:
        trial, maps = attention_maps(experiment, trial_id=trial_id, n_images=n_images, split=split)
    except (FileNotFoundError, RuntimeError, KeyError) as exc:
        note = str(exc)
    except ConfigError as exc:  # the trial's data can't be rebuilt here (e.g. a folder dataset that moved)
        note = f"the best trial's data could not be rebuilt: {exc}"
    except Exception as exc:  # noqa: BLE001 - e.g. a checkpoint from an older model version: report the rest
        note = f"the best trial's model could not be rebuilt ({type(exc).__name__}: {exc})"
    else:
        return trial, maps, None
    return None, [], " ".join(note.split())  # one line


def plot_attention(maps: list[AttentionMap], trial: TrialModel | None = None, title: str | None = None) -> Figure:
    """Each image with its M kept patches outlined and coloured by attention score (the notebook's view)."""
    n = max(1, len(maps))
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.6 * cols + 0.8, 3.9 * rows + 0.4), dpi=110, layout="constrained")
    if not maps:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no image to show", ha="center", va="center")
        ax.set_axis_off()
        return fig
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    top = max(float(m.scores.max()) for m in maps)
    norm = Normalize(0.0, top if top > 0 else 1.0)
    from matplotlib import colormaps

    cmap = colormaps["inferno"]
    mappable = None
    for ax, m in zip(axes, maps, strict=False):
        if m.source is not None:  # a whole slide: its thumbnail, the kept patches at their level-0 place
            from ips_search.report.slide_maps import draw_slide_attention

            drawn = draw_slide_attention(
                ax, m.source.path, m.source.coords, m.indices.numpy(), m.source.patch_size_level0,
                m.scores.numpy(), thumbnail_size=512, cache_dir=m.source.cache_dir, norm=norm,
            )  # fmt: skip
            mappable = mappable or drawn
            mark = "✓" if m.target == m.prediction else "✗"
            ax.set_title(f"test slide {m.index}: true {m.target}, predicted {m.prediction} {mark}", fontsize=9)
            continue
        img = m.image.numpy()
        if img.shape[0] == 1:
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(np.transpose(img[:3], (1, 2, 0)).clip(0, 1))
        heat = m.heatmap.numpy()
        kept = np.zeros(heat.shape, dtype=bool)
        cols_grid = m.grid[1]
        for idx in m.indices.tolist():
            r, c = divmod(int(idx), cols_grid)
            kept[r * m.stride : r * m.stride + m.patch_size, c * m.stride : c * m.stride + m.patch_size] = True
        mappable = ax.imshow(np.ma.masked_where(~kept, heat), cmap=cmap, norm=norm, alpha=0.55)
        small = len(m.indices) <= 16
        for idx, score in zip(m.indices.tolist(), m.scores.tolist(), strict=True):
            r, c = divmod(int(idx), cols_grid)
            x0, y0 = c * m.stride - 0.5, r * m.stride - 0.5
            ax.add_patch(
                Rectangle((x0, y0), m.patch_size, m.patch_size, fill=False, linewidth=1.4, edgecolor=cmap(norm(score)))
            )
            if small:
                ax.text(
                    x0 + 2,
                    y0 + 2,
                    f"{score:.2f}",
                    color="white",
                    fontsize=7,
                    va="top",
                    ha="left",
                    bbox={"facecolor": "black", "alpha": 0.55, "pad": 1, "linewidth": 0},
                )
        mark = "✓" if m.target == m.prediction else "✗"
        ax.set_title(
            f"test image {m.index}: true {literal_text(m.target)}, predicted {literal_text(m.prediction)} {mark}",
            fontsize=9,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(maps) :]:
        ax.set_axis_off()
    if mappable is not None:
        fig.colorbar(mappable, ax=axes[: len(maps)].tolist(), label="attention score of a kept patch", shrink=0.8)
    if title is None and trial is not None:
        cfg = trial.model.cfg
        n_patches = maps[0].grid[0] * maps[0].grid[1]
        epoch = "?" if trial.epoch is None else trial.epoch + 1
        title = (
            f"Attention of trial {literal_text(trial.trial_id)} (epoch {epoch}): "
            f"the M={cfg.memory_size} of N={n_patches} patches IPS keeps (I={cfg.iteration_size}, "
            f"P={cfg.patch_size}), coloured by score"
        )
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
