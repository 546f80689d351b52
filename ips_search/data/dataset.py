"""The one Dataset class all sources share: stored uint8 images -> (patches, targets)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ips_search.data.patches import patch_grid, patchify


class PatchDataset(Dataset):
    """Items are ``(patches, targets)``.

    ``patches`` is float32 ``(N, C, P, P)`` in [0, 1] (N patches of size P in
    row-major grid order), ``targets`` a dict ``{task: tensor}`` with an int64
    scalar per softmax task and a float32 ``(K,)`` vector per multi-label task, so
    the default collate gives ``(B, N, C, P, P)`` and ``(B,)`` / ``(B, K)`` tensors.

    ``images`` is uint8 ``(n, C, h, w)``; ``indices`` picks this split's rows (no
    copy of the shared array); with ``image_size`` each image is resized (bilinear)
    to ``image_size x image_size`` on access instead of being stored large.
    ``meta`` holds optional per-item tensors (aligned with this split) for checks.
    ``item_ids`` names each row of ``images`` (unique across the cohort: a file's path, a canvas key such as
    ``train-00012``) and ``patients`` its patient (default: the item's own name); the dataset keeps this split's,
    aligned with its items (default names: the row numbers).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: dict[str, torch.Tensor],
        patch_size: int,
        stride: int | None = None,
        indices: torch.Tensor | None = None,
        image_size: int | None = None,
        meta: dict[str, torch.Tensor] | None = None,
        item_ids: Sequence[str] | None = None,
        patients: Sequence[str] | None = None,
    ) -> None:
        assert images.dtype == torch.uint8 and images.dim() == 4, "images must be uint8 (n, C, h, w)"
        self.images = images
        self.indices = torch.arange(len(images)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        self.targets = {k: v[self.indices] for k, v in targets.items()}
        self.meta = {k: v[self.indices] for k, v in (meta or {}).items()}
        rows = self.indices.tolist()
        names = [f"{i:05d}" for i in range(len(images))] if item_ids is None else list(item_ids)
        assert len(names) == len(images), "one item id per image"
        self.item_ids: list[str] = [str(names[i]) for i in rows]
        self.patients: list[str] = list(self.item_ids) if patients is None else [str(patients[i]) for i in rows]
        self.patch_size = patch_size
        self.stride = stride or patch_size
        self.image_size = image_size
        self.n_chan = images.shape[1]
        self.image_hw = (image_size, image_size) if image_size else (images.shape[2], images.shape[3])
        self.grid = patch_grid(*self.image_hw, self.patch_size, self.stride)
        self.classes: list[str] | None = None  # class names, where the source has them (folder)
        self.paths: list | None = None  # per-item source file, where there is one (folder)
        self.shift: Callable[[torch.Tensor], torch.Tensor] | None = None  # set by augment_shift (training split)

    def augment_shift(self, pixels: int) -> None:
        """Shift every image read by up to ``pixels`` in each direction (zero fill) before it is cut into patches.

        A random crop of the zero-padded image, as torchvision does it; the draws come from torch's global RNG,
        which the trial seeds. ``image()`` (maps, previews) stays unshifted."""
        from torchvision.transforms import v2

        self.shift = v2.RandomCrop(self.image_hw, padding=pixels, fill=0) if pixels else None

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, i: int) -> torch.Tensor:
        """The whole image ``(C, H, W)`` float32 in [0, 1] (e.g. for attention-map plots)."""
        img = self.images[self.indices[i]].float().div_(255)  # (C, h, w)
        if self.image_size and img.shape[-2:] != self.image_hw:
            shrink = self.image_size < img.shape[-1]
            img = F.interpolate(img[None], size=self.image_hw, mode="bilinear", align_corners=False, antialias=shrink)
            img = img[0].clamp_(0, 1)  # (C, H, W)
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        img = self.image(i)  # (C, H, W)
        if self.shift is not None:
            img = self.shift(img)
        patches = patchify(img, self.patch_size, self.stride)  # (N, C, P, P)
        return patches, {k: v[i] for k, v in self.targets.items()}
