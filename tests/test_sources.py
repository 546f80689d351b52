"""IPS over lazy patch sources: the same selection as the tensor path, variable N, read-ahead, flat host memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import as_sets, bar_batch, bar_net, notebook_ips
from torch import nn
from torch.utils.data import Dataset

from ips_search import IPSConfig, IPSNet, TrainConfig
from ips_search.data.source import (
    ArrayPatchSource,
    PatchSource,
    TensorPatchSource,
    collate_sources,
    is_patch_source,
    read_patches,
)
from ips_search.errors import ConfigError
from ips_search.model import ips as ips_module
from ips_search.model.prefetch import Prefetcher
from ips_search.train import make_loader, make_optimizer, train_step

ROOT = Path(__file__).resolve().parents[1]


def small_net(M: int, I: int, **kw) -> IPSNet:
    torch.manual_seed(0)
    cfg = IPSConfig(
        memory_size=M, iteration_size=I, patch_size=16, n_chan=1, encoder="small-cnn", dim=64, d_inner=128, **kw
    )
    net = IPSNet(cfg)
    net.train()
    net.encode(torch.rand(32, 1, 16, 16) * 3)  # BatchNorm statistics away from their init
    return net


def sources_of(patches: torch.Tensor) -> list[TensorPatchSource]:
    return [TensorPatchSource(p) for p in patches]


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ips-prefetch"]


class FailingSource:
    """A source whose ``read`` raises at its ``fail_at``-th call; counts its calls."""

    def __init__(self, patches: torch.Tensor, fail_at: int) -> None:
        self.inner, self.fail_at, self.calls = TensorPatchSource(patches), fail_at, 0
        self.patch_shape, self.coords = self.inner.patch_shape, None
        self.error = OSError("disk went away")

    def __len__(self) -> int:
        return len(self.inner)

    def read(self, index: np.ndarray) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        return self.inner.read(index)


# -- the protocol ----------------------------------------------------------------------------------------------------
def test_tensor_and_array_sources_follow_the_protocol(tmp_path):
    patches = torch.rand(10, 1, 4, 4)
    np.save(tmp_path / "p.npy", (patches.numpy() * 255).astype(np.uint8))
    coords = np.arange(20).reshape(10, 2)
    memmap = ArrayPatchSource(np.load(tmp_path / "p.npy", mmap_mode="r"), coords=coords, scale=1 / 255)
    for source in (TensorPatchSource(patches, coords=coords), memmap):
        assert is_patch_source(source) and isinstance(source, PatchSource)
        assert len(source) == 10 and source.patch_shape == (1, 4, 4) and source.coords.dtype == np.int64
        for index in (np.arange(3, 7), np.array([9, 0, 4]), np.array([], dtype=np.int64)):
            out = read_patches(source, index)
            assert out.dtype == torch.float32 and out.shape == (len(index), 1, 4, 4)
            torch.testing.assert_close(out, patches[index], atol=1 / 255, rtol=0)
    assert not is_patch_source(patches)
    with pytest.raises(ConfigError, match=r"coords must have shape \(10, 2\)"):
        TensorPatchSource(patches, coords=np.zeros((9, 2)))


def test_read_patches_names_a_source_that_breaks_the_protocol():
    class Wrong(TensorPatchSource):
        def read(self, index):
            return super().read(index).double()

    with pytest.raises(ValueError, match=r"Wrong.read returned torch.float64 \(2, 3\); .* float32 \(2, 3\)"):
        read_patches(Wrong(torch.rand(5, 3)), np.arange(2))


# -- the same selection as the tensor path ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("B", "N", "M", "I", "encode_chunk"),
    [(1, 25, 5, 5, 256), (3, 30, 4, 7, 7), (2, 23, 5, 3, 1), (3, 20, 5, 17, 6), (2, 16, 1, 1, 4), (2, 40, 10, 10, 9)],
)
def test_sources_select_what_the_tensor_path_selects(B, N, M, I, encode_chunk):
    net = small_net(M, I, encode_chunk=encode_chunk)
    patches = torch.rand(B, N, 1, 16, 16)
    _, expected = net.ips(patches)
    for prefetch in (True, False):
        mem_patch, mem_idx = net.ips(sources_of(patches), prefetch=prefetch)
        assert mem_idx.shape == (B, M) and mem_idx.dtype == torch.int64
        assert as_sets(mem_idx) == as_sets(expected), f"prefetch={prefetch}"
        assert torch.equal(mem_idx, mem_idx.sort(dim=1).values)  # ascending: read back in file order
        assert mem_patch.shape == (B, M, 1, 16, 16)
        for b in range(B):
            assert torch.equal(mem_patch[b], patches[b, mem_idx[b]])
    assert not prefetch_threads()


def test_variable_n_per_image_matches_each_image_alone():
    net = small_net(4, 3, encode_chunk=8)
    images = [torch.rand(n, 1, 16, 16) for n in (4, 9, 37, 100)]
    mem_patch, mem_idx = net.ips([TensorPatchSource(x) for x in images])
    assert mem_patch.shape == (4, 4, 1, 16, 16)
    assert mem_idx[0].tolist() == [0, 1, 2, 3]  # N == M keeps every patch
    for b, x in enumerate(images[1:], start=1):
        _, alone = net.ips(x[None])
        assert as_sets(mem_idx[b : b + 1]) == as_sets(alone) == as_sets(notebook_ips(net, x[None], 4, 3))
        assert torch.equal(mem_patch[b], x[mem_idx[b]])


def test_feature_sources_with_d_shaped_patches():
    """Pre-extracted features: patch_shape (D,), an encoder mapping (k, D) -> (k, dim); nothing assumes 5-D.
    Also the folded no-grad copy of an encoder with Linear layers (it once failed under inference mode)."""
    net = small_net(3, 5, encode_chunk=10)
    net.encoder = nn.Sequential(nn.Linear(12, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64))
    net._fold_tried, net._folded = False, None
    features = torch.randn(2, 50, 12)
    _, expected = net.ips(features)
    assert net._folded is not None
    net.cfg.fold_bn = False
    _, unfolded = net.ips(features)
    assert as_sets(unfolded) == as_sets(expected)
    net.cfg.fold_bn = True
    mem_patch, mem_idx = net.ips([TensorPatchSource(f) for f in features])
    assert mem_patch.shape == (2, 3, 12) and as_sets(mem_idx) == as_sets(expected)
    ragged = [TensorPatchSource(torch.randn(n, 12)) for n in (7, 61)]
    mem_patch, mem_idx = net.ips(ragged)
    assert mem_patch.shape == (2, 3, 12) and int(mem_idx[0].max()) < 7
    assert net(mem_patch, mem_idx).shape == (2, 10)


@pytest.mark.parametrize("loading", ["eager", "eager-sequential", "lazy"])
def test_loading_modes_unaffected(loading):
    net = small_net(5, 4, loading=loading, encode_chunk=16)
    patches = torch.rand(2, 33, 1, 16, 16)
    mem_patch, mem_idx = net.ips(patches)
    assert as_sets(mem_idx) == as_sets(notebook_ips(net, patches, 5, 4))
    assert all(torch.equal(mem_patch[b], patches[b, mem_idx[b]]) for b in range(2))
    _, from_sources = net.ips(sources_of(patches))
    assert as_sets(from_sources) == as_sets(mem_idx)


def test_fewer_patches_than_memory_is_one_clear_error():
    net = small_net(5, 5)
    sources = [TensorPatchSource(torch.rand(n, 1, 16, 16)) for n in (20, 3)]
    with pytest.raises(ConfigError, match="image 1 of the batch has 3 patches, fewer than memory_size 5") as info:
        net.ips(sources)
    assert "lower memory_size to 3" in str(info.value) and "\n" not in str(info.value)


def test_orient_scores_accepts_sources():
    net = small_net(2, 4)
    patches = torch.rand(3, 20, 1, 16, 16)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    from_tensor = net.orient_scores(patches)
    net.load_state_dict(state)
    torch.testing.assert_close(net.orient_scores(sources_of(patches)), from_tensor, rtol=1e-4, atol=1e-5)

    class Counting(TensorPatchSource):
        read_rows = 0

        def read(self, index):
            Counting.read_rows += len(index)
            return super().read(index)

    big = Counting(torch.rand(ips_module.ORIENT_PATCHES * 2 + 5, 1, 16, 16))
    assert net.orient_scores([big]).shape == (net.cfg.heads,)
    assert Counting.read_rows == ips_module.ORIENT_PATCHES  # an even sample of a large image, not all of it


# -- training --------------------------------------------------------------------------------------------------------
def test_variable_n_batch_trains_a_step():
    torch.manual_seed(0)
    net = bar_net()
    x, targets = bar_batch(3)
    sources = [TensorPatchSource(x[0]), TensorPatchSource(x[1, :9]), TensorPatchSource(torch.cat([x[2], x[2]]))]
    cfg = TrainConfig(lr=1e-3)
    optimizer = make_optimizer(net, cfg)
    before = [p.detach().clone() for p in net.parameters()]
    net.train()
    logits, loss = train_step(net, sources, targets, optimizer, cfg, torch.device("cpu"))
    assert np.isfinite(loss) and logits["label"].shape == (3, 2)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


class SourceDataset(Dataset):
    """Images of different N as lazy sources."""

    def __init__(self, sizes: list[int]) -> None:
        self.items = [
            (TensorPatchSource(torch.rand(n, 1, 8, 8)), {"label": torch.tensor(i % 2)}) for i, n in enumerate(sizes)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def test_collate_and_make_loader_on_a_dataset_of_sources():
    dataset = SourceDataset([16, 40, 9, 23, 16])
    sources, targets = collate_sources([dataset[0], dataset[1]])
    assert [len(s) for s in sources] == [16, 40] and targets["label"].tolist() == [0, 1]
    loader = make_loader(dataset, TrainConfig(batch_size=2, num_workers=0), shuffle=False, device=torch.device("cpu"))
    batches = list(loader)
    assert [[len(s) for s in b[0]] for b in batches] == [[16, 40], [9, 23], [16]]
    assert batches[1][1]["label"].tolist() == [0, 1]
    net = bar_net()
    optimizer = make_optimizer(net, TrainConfig())
    _, loss = train_step(net, batches[0][0], batches[0][1], optimizer, TrainConfig(), torch.device("cpu"))
    assert np.isfinite(loss)
    # a dataset of tensors still gets the default collate
    tensors = [(torch.rand(6, 1, 8, 8), {"label": torch.tensor(0)}) for _ in range(3)]
    patches, _ = next(iter(make_loader(tensors, TrainConfig(batch_size=3), shuffle=False, device=torch.device("cpu"))))
    assert isinstance(patches, torch.Tensor) and patches.shape == (3, 6, 1, 8, 8)


# -- read-ahead ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_prefetcher_keeps_order_and_stops_on_error(depth):
    assert list(Prefetcher(lambda j: j * j, range(7), depth)) == [0, 1, 4, 9, 16, 25, 36]
    error = KeyError("chunk 3")

    def fn(j: int) -> int:
        if j == 3:
            raise error
        return j

    got = []
    with pytest.raises(KeyError) as info:
        for item in Prefetcher(fn, range(7), depth):
            got.append(item)
    assert info.value is error and got == [0, 1, 2]
    assert not prefetch_threads()


def test_prefetcher_closed_early_stops_its_thread_and_reads_boundedly():
    calls = []
    release = threading.Event()

    def fn(j: int) -> int:
        calls.append(j)
        release.wait(5)
        return j

    with Prefetcher(fn, range(1000), depth=2) as reads:
        release.set()
        assert next(reads) == 0
    assert not prefetch_threads()
    assert len(calls) <= 1 + 2 + 1  # the one taken, depth queued, at most one in flight when closed
    assert list(reads) == []


def test_ips_propagates_a_read_error_and_stops_the_reader():
    net = small_net(4, 4, encode_chunk=5)
    good = TensorPatchSource(torch.rand(30, 1, 16, 16))
    bad = FailingSource(torch.rand(30, 1, 16, 16), fail_at=3)
    with pytest.raises(OSError) as info:
        net.ips([good, bad])
    assert info.value is bad.error
    assert bad.calls == 3  # the failed read was the last
    assert not prefetch_threads()
    assert net.training  # the mode is restored on the error path too


# -- host memory -----------------------------------------------------------------------------------------------------
RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from ips_search import IPSConfig, IPSNet

    class Synthetic:  # patches computed from their index: the source itself holds nothing
        patch_shape, coords = (1, 8, 8), None
        def __init__(self, n, hold):
            self.n, self.held = n, [] if hold else None
        def __len__(self):
            return self.n
        def read(self, index):
            t = torch.from_numpy(np.asarray(index)).float().view(-1, 1, 1, 1)
            out = torch.sin(t * 0.37 + torch.arange(64.0).view(1, 8, 8) * 0.11)  # (k, 1, 8, 8)
            if self.held is not None:  # the control: a source that keeps every chunk it read
                self.held.append(out.clone())
            return out

    def peak_rss_kb():  # VmHWM: this process's own peak (ru_maxrss would start at the parent's size at exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    cfg = IPSConfig(memory_size=8, iteration_size=256, patch_size=8, n_chan=1, encoder="small-cnn", dim=16,
                    d_inner=32, heads=2, d_k=8, d_v=8, encode_chunk=256)
    net = IPSNet(cfg)
    net.ips([Synthetic(4000, False)])  # warm-up: allocator pools, reader thread, folded encoder
    before = peak_rss_kb()
    _, mem_idx = net.ips([Synthetic(int(sys.argv[1]), sys.argv[2] == "hold")])
    after = peak_rss_kb()
    print(json.dumps({"growth_mb": (after - before) / 1024, "max_idx": int(mem_idx.max())}))
    """
)


def _peak_rss_growth_mb(n: int, hold: bool = False) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(n), "hold" if hold else "stream"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_host_memory_stays_flat_in_n():
    """Peak RSS growth of a selection over N = 200k patches (51 MB as one float32 tensor) vs N = 20k. Measured on
    the development VM (VmHWM): 0.5 MB and 1.3 MB; the control, a source that keeps what it read, grew 71 MB."""
    small, large = _peak_rss_growth_mb(20_000), _peak_rss_growth_mb(200_000)
    assert large["max_idx"] >= 20_000  # the selection really ran over all of N
    assert large["growth_mb"] - small["growth_mb"] < 12, (small, large)
    control = _peak_rss_growth_mb(200_000, hold=True)
    assert control["growth_mb"] > 40, (small, large, control)  # the measurement sees a source that grows


# -- CUDA ------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_chunks_go_through_pinned_buffers(monkeypatch):
    pinned = []

    class Recording(Prefetcher):
        def __next__(self):
            chunk = super().__next__()
            pinned.append(chunk.is_pinned())
            return chunk

    monkeypatch.setattr(ips_module, "Prefetcher", Recording)
    net = small_net(4, 4, encode_chunk=16)
    patches = torch.rand(2, 70, 1, 16, 16)
    net.to("cuda")
    # one image per tensor call: the same 16-patch encoder batches as the source path, so the same kernels
    expected = torch.cat([net.ips(patches[b : b + 1].cuda())[1] for b in range(2)])
    mem_patch, mem_idx = net.ips(sources_of(patches))
    assert mem_patch.device.type == mem_idx.device.type == "cuda"
    assert pinned and all(pinned)
    assert as_sets(mem_idx) == as_sets(expected)
    assert torch.equal(mem_patch[1].cpu(), patches[1, mem_idx[1].cpu()])
