"""``shuffle``: training streams the patches in a random order (per batch or per image), as the original IPS code can;
evaluation never shuffles, and ``none`` keeps the notebook's selection."""

from __future__ import annotations

import pytest
import torch
from reference import as_sets, notebook_ips

from ips_search import IPSConfig, IPSNet, Task
from ips_search.errors import ConfigError

N, M, I = 30, 4, 5
TASKS = (Task("a", 3), Task("b", 4))  # two queries: a patch's score depends on the patches it is scored with


def net(shuffle: str = "none", **kw) -> IPSNet:
    torch.manual_seed(0)
    cfg = IPSConfig(
        memory_size=M,
        iteration_size=I,
        patch_size=16,
        n_chan=1,
        encoder="small-cnn",
        dim=32,
        d_inner=64,
        tasks=TASKS,
        shuffle=shuffle,
        **{"use_pos": True, **kw},
    )
    return IPSNet(cfg)


def patches() -> torch.Tensor:
    return torch.rand(3, N, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def test_none_keeps_the_notebook_selection_in_training_too():
    model = net("none", use_pos=False).train()
    x = patches()
    assert as_sets(model.ips(x)[1]) == as_sets(notebook_ips(model, x, M, I))


@pytest.mark.parametrize("impl", ["streaming", "reference"])
@pytest.mark.parametrize("loading", ["eager", "eager-sequential", "lazy"])
def test_shuffled_selection_equals_the_unshuffled_model_on_the_permuted_patches(impl, loading):
    shuffled = net("instance", ips_impl=impl, loading=loading).train()
    plain = net("none", ips_impl=impl, loading=loading)
    plain.load_state_dict(shuffled.state_dict())
    x = patches()
    torch.manual_seed(7)
    kept = shuffled.ips(x)[1]
    torch.manual_seed(7)
    order = shuffled.shuffle_order(*x.shape[:2])  # the same draw
    assert not torch.equal(order, torch.arange(N).expand(3, -1))
    assert as_sets(plain.ips(x, order=order)[1]) == as_sets(kept)  # same patches, same positional encodings
    # and without positional encodings, the plain model on physically permuted patches keeps the same ones
    shuffled.cfg.use_pos = plain.cfg.use_pos = False
    shuffled.pos_enc = plain.pos_enc = None
    torch.manual_seed(7)
    kept = shuffled.ips(x)[1]
    permuted = torch.stack([x[b, order[b]] for b in range(3)])
    on_permuted = plain.ips(permuted)[1]
    assert as_sets(torch.gather(order, 1, on_permuted)) == as_sets(kept)


def test_batch_shuffle_draws_one_order_for_the_batch_and_instance_one_per_image():
    torch.manual_seed(0)
    batch = net("batch").train().shuffle_order(4, N)
    assert all(torch.equal(batch[0], row) for row in batch)
    instance = net("instance").train().shuffle_order(4, N)
    assert len({tuple(row.tolist()) for row in instance}) == 4
    assert all(sorted(row.tolist()) == list(range(N)) for row in instance)


def test_evaluation_never_shuffles():
    model = net("instance").eval()
    x = patches()
    first = model.ips(x)[1]
    torch.manual_seed(123)
    assert torch.equal(model.ips(x)[1], first) and model.shuffle_order(3, N) is None


def test_the_order_changes_what_is_kept_with_several_queries():
    model = net("instance", use_pos=False, heads=8)
    x = torch.rand(16, N, 1, 16, 16, generator=torch.Generator().manual_seed(1)) ** 3  # 16 images
    plain = as_sets(model.eval().ips(x)[1])
    model.train()
    differs = 0
    for seed in range(5):
        torch.manual_seed(seed)
        differs += sum(a != b for a, b in zip(as_sets(model.ips(x)[1]), plain, strict=True))
    assert differs > 0  # otherwise the option would be a no-op (7 of 80 selections differed when written)


def test_unknown_shuffle_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown shuffle 'random'"):
        IPSConfig(shuffle="random")
