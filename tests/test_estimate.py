"""estimate_step_memory predicts a training step's peak memory on fake tensors: no GPU, nothing computed."""

from __future__ import annotations

import gc

import pytest
import torch

from ips_search.config import DataConfig, ExperimentConfig, IPSConfig, Task, TrainConfig
from ips_search.estimate import estimate_config, even_sample, main, space_grid
from ips_search.prediction import clear_cache, estimate_step_memory, measure_step_memory
from ips_search.space import load_space

LABEL = (Task("label", 10),)


def _exp(memory_size=4, batch_size=4, encode_chunk=16, loading="eager", amp=True, **model) -> ExperimentConfig:
    """A tiny small-cnn IPSNet on 32-px patches."""
    ips = IPSConfig(
        encoder="small-cnn", dim=32, heads=2, d_k=16, d_v=16, d_inner=64, memory_size=memory_size,
        iteration_size=4, encode_chunk=encode_chunk, loading=loading, **model,
    )  # fmt: skip
    return ExperimentConfig(
        data=DataConfig(patch_size=32), model=ips, train=TrainConfig(batch_size=batch_size, amp=amp)
    )


def test_a_space_config_is_estimated_without_cuda_and_cached():
    space = load_space("smoke")
    params = {"patch_size": 32, "memory_size": 4, "iteration_size": 4, "lr": 1e-3}
    est = estimate_config(space, params)
    assert est.device == "cuda"
    assert est.weights_mb > 0 and est.grads_mb == est.weights_mb  # every weight trains
    assert est.optimizer_mb >= 2 * est.weights_mb  # AdamW's two moments
    assert est.state_mb >= est.weights_mb + est.grads_mb + est.optimizer_mb  # + the folded encoder copy
    assert est.peak_mb == pytest.approx(est.state_mb + est.activations_mb)
    assert est.activations_mb > 0
    assert estimate_config(space, {**params, "lr": 1e-3}) is est  # a trial's repeated call costs nothing


def test_the_estimate_grows_with_memory_size_and_batch_size():
    base = estimate_step_memory(_exp(), 64, 1, LABEL).peak_mb
    more_kept = estimate_step_memory(_exp(memory_size=24), 64, 1, LABEL).peak_mb
    bigger_batch = estimate_step_memory(_exp(batch_size=16), 64, 1, LABEL).peak_mb
    assert more_kept > 1.5 * base, (base, more_kept)  # M patches encoded with gradients
    assert bigger_batch > 2 * base, (base, bigger_batch)


def test_the_estimate_is_flat_in_the_patch_count():
    """IPS's point: memory does not grow with N. With lazy loading only encoder chunks reach the device; with eager
    loading the whole batch does, and the estimate grows by exactly its bytes."""
    lazy = [estimate_step_memory(_exp(loading="lazy"), n, 1, LABEL).peak_mb for n in (64, 1024)]
    assert lazy[1] == pytest.approx(lazy[0], rel=0.02), lazy
    eager = [estimate_step_memory(_exp(), n, 1, LABEL).peak_mb for n in (64, 1024)]
    batch_growth_mb = 4 * (1024 - 64) * 32 * 32 * 4 / 2**20  # B x extra patches x P x P x float32
    assert eager[1] - eager[0] == pytest.approx(batch_growth_mb, rel=0.01), eager
    full = estimate_step_memory(_exp(memory_size=63), 64, 1, LABEL).peak_mb  # every patch kept: no selection
    assert full > 2 * eager[0], (full, eager)


def test_bfloat16_autocast_shrinks_the_cuda_estimate_and_is_ignored_on_the_cpu():
    exp_amp, exp_fp32 = _exp(memory_size=24, batch_size=8), _exp(memory_size=24, batch_size=8, amp=False)
    amp, fp32 = (estimate_step_memory(e, 64, 1, LABEL).activations_mb for e in (exp_amp, exp_fp32))
    assert amp < 0.85 * fp32, (amp, fp32)
    cpu_amp, cpu_fp32 = (estimate_step_memory(e, 64, 1, LABEL, device="cpu").peak_mb for e in (exp_amp, exp_fp32))
    assert cpu_amp == cpu_fp32  # autocast only applies to CUDA steps, as in train_step


def test_the_estimate_does_not_depend_on_when_the_garbage_collector_runs():
    """Tensors held in reference cycles die when Python's collector runs; the meter pauses it, so a cold estimate
    gives the same bytes however often the collector would have run."""
    saved = gc.get_threshold()
    seen = set()
    try:
        for threshold in (1, 10, 700):
            gc.set_threshold(threshold)
            clear_cache()
            est = estimate_step_memory(_exp(memory_size=24, batch_size=8), 64, 1, LABEL, device="cpu")
            seen.add((est.peak_mb, est.state_mb))
    finally:
        gc.set_threshold(*saved)
    assert len(seen) == 1, seen


def test_several_tasks_and_a_multi_label_head_are_estimated():
    tasks = (Task("majority", 10), Task("multilabel", 10, multi_label=True))
    one = estimate_step_memory(_exp(), 64, 1, LABEL)
    two = estimate_step_memory(_exp(), 64, 1, tasks)
    assert two.weights_mb > one.weights_mb  # a second query token and head


def test_bad_arguments_are_one_line_config_errors():
    from ips_search.errors import ConfigError

    with pytest.raises(ConfigError, match="n_patches"):
        estimate_step_memory(_exp(), 0, 1, LABEL)
    with pytest.raises(ConfigError, match="device"):
        estimate_step_memory(_exp(), 64, 1, LABEL, device="tpu")


def test_the_grid_holds_feasible_configs_and_the_sample_spreads_over_it():
    space = load_space("smoke")
    grid = space_grid(space)
    n = space.n_patches(32)
    assert all(c["memory_size"] < n and c["iteration_size"] <= n - c["memory_size"] for c in grid)
    assert len(grid) == 7 * 7  # M in 2..8, I in 2..8 at N = 16
    sample = even_sample(grid, 5)
    assert len(sample) == 5 and sample[0] == grid[0] and sample[-1] == grid[-1]
    assert even_sample(grid, 100) == grid


def test_cli_prints_a_table_marking_what_fits(capsys):
    assert main(["--space", "smoke", "--sample", "2", "--max-memory-mb", "1000", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 spread evenly over 49 configs, batch 2" in out
    assert out.count("| yes") == 2 and "2 of 2 fit 1000 MB" in out
    assert "leaves out" in out and "CUDA context" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--space", "no-such-space"], "no-such-space"),
        (["--space", "smoke", "--batch-size", "0"], "--batch-size"),
        (["--space", "smoke", "--max-memory-mb", "-5"], "--max-memory-mb"),
        (["--space", "smoke", "--sample", "0"], "--sample"),
    ],
)
def test_cli_bad_inputs_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--batch-size", "many"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_prediction_matches_max_memory_allocated_of_a_real_step():
    """ResNet-18 on 32-px patches, batch 16, M = I = 8, bfloat16 autocast: within 10% of the allocator's peak
    (cuBLAS workspaces, which are no tensor, taken out)."""
    exp = ExperimentConfig(
        data=DataConfig(patch_size=32),
        model=IPSConfig(encoder="resnet18", memory_size=8, iteration_size=8),
        train=TrainConfig(batch_size=16),
    )
    predicted = estimate_step_memory(exp, 64, 1, LABEL).peak_mb
    measured = measure_step_memory(exp, 64, 1, LABEL)
    print(f"predicted {predicted:.1f} MB, measured {measured}")
    assert predicted == pytest.approx(measured["tensors_mb"], rel=0.10)
