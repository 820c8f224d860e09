"""The speed benchmark run for real at a tiny size: four sections of positive, finite numbers in the JSON.

Speed targets are what the benchmark measures, not what a unit test asserts:
these tests check that every figure is produced and is a sane number.
"""
import json
import math

import pytest

from dusss.experiments.bench import UNET_VARIANTS, benchmark, format_table
from dusss.cli import main as cli_main
from dusss.config import make_config


def _positive_numbers(obj, path=""):
    """Every int/float leaf of a nested dict, with its path."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _positive_numbers(value, f"{path}.{key}")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setenv("DUSSS_RESULTS", str(root / "results"))
    try:
        rc = cli_main(["bench", "--profile", "smoke", "--data-root", str(root / "data"), "--set",
                       f"vlm_checkpoint={root / 'no-vlm.pt'}", "--set", "num_threads=1", "--repeats", "2", "--warmup", "1",
                       "--matmul-n", "256", "--no-compile"])
    finally:
        mp.undo()
    assert rc == 0
    path = root / "results" / "bench_smoke.json"
    assert path.is_file(), "a smoke run writes bench_smoke.json, never the committed bench.json"
    assert not (root / "results" / "bench.json").exists()
    return json.loads(path.read_text())


def test_bench_json_has_the_four_sections_with_positive_finite_numbers(bench_json):
    for section in ("text_guidance", "unet_flops", "vlm_pretrain", "loader"):
        assert section in bench_json, section
        numbers = list(_positive_numbers(bench_json[section], section))
        assert numbers, section
        for path, value in numbers:
            # the rise over the resident size may be 0 when memory is reused; num_workers 0 is a setting
            if path.endswith(("delta_mb", "num_workers")):
                assert math.isfinite(value) and value >= 0, (path, value)
            else:
                assert math.isfinite(value) and value > 0, (path, value)


def test_bench_ratios_are_the_ratios_of_the_step_times(bench_json):
    t = bench_json["text_guidance"]
    s = t["step_seconds"]
    assert set(s) == {"mt", "dusss_cached", "dusss_on_the_fly"}
    assert t["ratio_cached_over_mt"] == pytest.approx(s["dusss_cached"] / s["mt"])
    assert t["ratio_on_the_fly_over_mt"] == pytest.approx(s["dusss_on_the_fly"] / s["mt"])
    u = bench_json["unet_flops"]
    assert set(u["variants"]) | set(u["skipped"]) == set(UNET_VARIANTS) - {"compile"}
    fp32 = u["variants"]["fp32"]
    assert fp32["gflops"] == pytest.approx(u["flops_per_step"] / fp32["step_seconds"] / 1e9)
    assert fp32["fraction_of_matmul"] == pytest.approx(fp32["gflops"] / u["matmul_fp32_gflops"])
    assert fp32["speedup_vs_fp32"] == pytest.approx(1.0)
    v = bench_json["vlm_pretrain"]
    assert v["pairs_per_second"] == pytest.approx(v["batch"] / v["step_seconds"])
    d = bench_json["loader"]
    assert d["loader_to_step_ratio"] == pytest.approx(d["delivered_images_per_second"] / d["step_images_per_second"])
    assert bench_json["loader_to_step_ratio"] == d["loader_to_step_ratio"]


def test_unet_flops_match_a_hand_count_of_the_first_convolution(tmp_path):
    """The counted FLOPs include at least the first 3x3 convolution's forward, 2·B·H·W·C_in·C_out·9."""
    from dusss.experiments.bench import _step_flops
    import torch

    cfg = make_config("smoke", data_root=str(tmp_path), num_threads=1)
    b, s = 2, cfg.image_size
    x, y = torch.rand(b, 3, s, s), (torch.rand(b, 1, s, s) > 0.5).float()
    flops = _step_flops(cfg, torch.device("cpu"), x, y)
    first_conv = 2 * b * s * s * 3 * cfg.unet_base * 9
    assert flops > 3 * first_conv  # forward + backward of the whole net, far more than one conv's forward


def test_benchmark_refuses_unknown_variants_and_table_names_every_section(tmp_path, bench_json):
    cfg = make_config("smoke", data_root=str(tmp_path), num_threads=1)
    with pytest.raises(ValueError, match="unknown U-Net variant"):
        benchmark(cfg, variants=("fp32", "fp8"))
    table = format_table(bench_json)
    for words in ("text guidance", "GFLOP/s", "pairs/s", "images/s"):
        assert words in table


def test_step_throughput_cli_prints_images_per_second(tmp_path, monkeypatch, capsys):
    """The GPU check's command (--steps-only) at a tiny size on the CPU: positive images/s for both methods."""
    monkeypatch.setenv("DUSSS_RESULTS", str(tmp_path))
    rc = cli_main(["bench", "--profile", "smoke", "--steps-only", "--set", "num_threads=1", "--set", "image_size=32",
                   "--repeats", "2", "--warmup", "1"])
    assert rc == 0
    res = json.loads((tmp_path / "bench_steps_smoke_cpu.json").read_text())
    assert res["amp_bf16"] is False  # autocast only by default on CUDA
    assert set(res["images_per_second"]) == {"mt", "dusss_cached"}
    for name, ips in res["images_per_second"].items():
        assert math.isfinite(ips) and ips > 0
        assert ips == pytest.approx(res["batch"] / res["step_seconds"][name])
    assert "images/s" in capsys.readouterr().out
