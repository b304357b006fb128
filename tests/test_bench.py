"""The benchmark harness runs, reports every figure the README table needs, and rejects unknown cases
(timings themselves are never asserted: tests must not flake on a loaded machine)."""

import json
import os

import pytest

from bilevel_ssl import bench
from bilevel_ssl.runtime import ENV, tune_cpu_allocator


def test_cases_cover_every_objective_and_engine():
    from bilevel_ssl.hypergrad import ENGINES
    from bilevel_ssl.objectives import OBJECTIVES

    names = bench.cases()
    assert set(OBJECTIVES) <= set(names)
    assert {f"gessl_{e}" for e in ENGINES} <= set(names)
    assert {"multitask_sum", "multitask_pcgrad", "tc2_second_order", "mcr_second_order"} <= set(names)


def test_new_method_cases_run_and_bissl_reports_its_steps():
    record = bench.run(["multitask_pcgrad", "tc2_first_order", "mcr_second_order"], batch=16, steps=1, warmup=1,
                       progress=False, memory=False)
    assert {k: r["views"] for k, r in record["cases"].items()} == {
        "simclr": 2, "multitask_pcgrad": 2, "tc2_first_order": 4, "mcr_second_order": 2}
    b = record["bissl"]
    assert b["cg_iters"] == 5 and b["upper_over_hvps"] == pytest.approx(b["upper_s"] / b["hvps_s"])
    assert b["check_over_upper"] == pytest.approx(b["upper_checked_s"] / b["upper_s"] - 1)
    assert b["lower_ratio"] == pytest.approx(b["lower_s"] / record["cases"]["simclr"]["median_s"])
    assert record["targets"]["bissl_upper_over_hvps"]["target"] == 1.2
    assert "| BiSSL upper step (5 CG iterations;" in bench.table(record)
    assert "| BiSSL upper step + CG residual check (+" in bench.table(record)
    json.dumps(record)


def test_run_reports_ratios_memory_and_targets():
    record = bench.run(["gessl_first_order"], batch=16, steps=2, warmup=1, progress=False, bissl=False)
    assert list(record["cases"]) == ["simclr", "gessl_first_order"]  # the reference is always measured
    simclr, gessl = record["cases"]["simclr"], record["cases"]["gessl_first_order"]
    assert simclr["ratio"] == 1.0
    assert gessl["ratio"] == pytest.approx(gessl["median_s"] / simclr["median_s"])
    assert (simclr["views"], gessl["views"]) == (2, 3)
    assert gessl["params"] > simclr["params"]  # + the threshold network g
    assert simclr["peak_mem_mb"] > 0 and gessl["peak_mem_mb"] > 0
    assert set(record["targets"]) == {"gessl_first_order", "augment_share"}
    assert record["targets"]["gessl_first_order"]["target"] == 2.2
    json.dumps(record)  # JSON-serialisable as printed by the CLI
    assert "| gessl_first_order | 3 |" in bench.table(record)


def test_channels_last_cases_are_divided_by_simclr_in_the_same_memory_format():
    """Like with like (issue #24): an NHWC case's ratio_like is to simclr_channels_last, measured in the same run
    even when not asked for; its target is read on ratio_like; an NCHW case's ratio_like is its ratio."""
    names = bench.cases()
    assert {"gessl_first_order_channels_last", "tc2_second_order_channels_last", "mcr_second_order_channels_last",
            "multitask_pcgrad_channels_last"} <= set(names)
    assert names["tc2_second_order_channels_last"]["backbone_args"]["channels_last"] is True
    assert names["tc2_second_order_channels_last"]["meta"] == "tc2"
    assert bench.reference_of("gessl_second_order_channels_last") == "simclr_channels_last"
    assert bench.reference_of("gessl_second_order") == "simclr"
    record = bench.run(["gessl_first_order_channels_last"], batch=16, steps=1, warmup=0, progress=False,
                       memory=False, bissl=False)
    cases = record["cases"]
    assert list(cases) == ["simclr", "simclr_channels_last", "gessl_first_order_channels_last"]
    g, ref = cases["gessl_first_order_channels_last"], cases["simclr_channels_last"]
    assert g["ratio_like"] == pytest.approx(g["median_s"] / ref["median_s"])
    assert g["ratio"] == pytest.approx(g["median_s"] / cases["simclr"]["median_s"])
    assert cases["simclr"]["ratio_like"] == cases["simclr"]["ratio"] == 1.0
    t = record["targets"]["gessl_first_order_channels_last"]
    assert t["ratio"] == g["ratio_like"] and t["target"] == 2.2
    row = next(line for line in bench.table(record).splitlines() if line.startswith("| gessl_first_order_channels"))
    assert f"| {g['ratio']:.2f} | {g['ratio_like']:.2f} |" in row


def test_unknown_case_is_rejected_before_compute():
    with pytest.raises(ValueError, match=r"cases: unknown \['simclr_typo'\]; allowed: simclr"):
        bench.run(["simclr_typo"])
    with pytest.raises(ValueError, match="--profile: unknown case 'nope'"):
        bench.profile_case("nope")


def test_stage_times_reports_tc2s_labelled_stages(capsys):
    rec = bench.stage_times("tc2_first_order", batch=16, steps=1, warmup=1)
    assert list(rec["stages"]) == ["tc2.stage0_forward", "tc2.stage1_psi", "tc2.stage2_encoder"]
    assert all(v["s"] > 0 and v["share"] == pytest.approx(v["s"] / rec["step_s"]) for v in rec["stages"].values())
    # the stages are disjoint parts of one step: together at most the step (10% slack for timer granularity)
    assert sum(v["share"] for v in rec["stages"].values()) <= 1.1
    assert bench.stage_times("simclr", batch=16, steps=1, warmup=0)["stages"] == {}  # no labels, nothing invented
    with pytest.raises(ValueError, match="--stages: unknown case 'nope'"):
        bench.stage_times("nope")
    assert bench.main(["--stages", "tc2_first_order", "--batch", "16", "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["case"] == "tc2_first_order" and "tc2.stage2_encoder:" in out.err


def test_cli_lists_cases(capsys):
    assert bench.main(["--list"]) == 0
    assert "gessl_second_order" in capsys.readouterr().out.split()


def test_allocator_tuning_is_opt_in(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert tune_cpu_allocator() is False
    monkeypatch.setenv(ENV, "default")
    assert tune_cpu_allocator() is False


NOISE = ("USDT:", "CPUAllocator", "gpuGetDeviceCount", "profiler_start", "profiler_stop")


def test_cli_prints_json_and_table_without_profiler_noise():
    """The CLI on one tiny case, as a user runs it (its own process, so the profiler starts from scratch there):
    stdout is the JSON record, stderr the progress bar and the table, and none of Kineto's / c10's lines."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(bench.__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "bilevel_ssl.bench", "--cases", "simclr", "--batch", "8",
                          "--steps", "1", "--warmup", "0", "--no-bissl", "--threads", "1"],
                         capture_output=True, text=True, env=env, timeout=300, check=True)
    record = json.loads(out.stdout)
    assert list(record["cases"]) == ["simclr"] and record["cases"]["simclr"]["peak_mem_mb"] > 0  # profiled
    assert "| simclr | 2 |" in out.stderr
    assert not [p for p in NOISE if p in out.stderr], out.stderr


def test_quiet_profiler_drops_only_the_profiler_lines(capfd):
    import os

    with bench.quiet_profiler():
        os.write(2, b"USDT:2026-12-04 15:31:04 1:1 SyncActivityProfilerHandler.cpp:39] profiler_start\n")
        os.write(2, b"ERROR:2026-12-04 15:31:04 1:1 DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35\n")
        os.write(2, b"a real error of the profiled step\n")
    assert bench.profile_case("simclr", batch=8, steps=1, row_limit=3)  # the --profile table, also quiet
    err = capfd.readouterr().err
    assert "a real error of the profiled step" in err
    assert not [p for p in NOISE if p in err], err


def test_thread_count_is_pinned_from_the_environment(monkeypatch):
    from bilevel_ssl.runtime import pinned_threads

    monkeypatch.delenv("BILEVEL_SSL_THREADS", raising=False)
    assert pinned_threads() == 2
    monkeypatch.setenv("BILEVEL_SSL_THREADS", "3")
    assert pinned_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("BILEVEL_SSL_THREADS", bad)
        with pytest.raises(ValueError, match="BILEVEL_SSL_THREADS: must be a whole number"):
            pinned_threads()


def test_bench_configs_times_each_configuration_once(monkeypatch):
    """The notebooks' back-to-back benchmark: one bench_case per distinct configuration (rows with the same
    configuration share its measurement), the config's own fields as overrides, an overflow is a NaN row."""
    from bilevel_ssl.experiments import make_config

    calls, shapes = [], []

    def fake_case(overrides, *, batch, steps, warmup, device, channels, size, memory):
        calls.append(overrides)
        shapes.append((channels, size))
        if overrides["seed"] == 9:
            raise FloatingPointError("overflow")
        return {"median_s": 0.5 + len(calls), "iqr_s": 0.1, "peak_mem_mb": float("nan"), "params": 1000,
                "views": 2}

    monkeypatch.setattr(bench, "bench_case", fake_case)
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (0.5, 0.0, 0.0))
    configs = {("base", "simclr"): make_config("simclr"), ("engine", "second_order"): make_config("simclr"),
               ("engine", "x"): make_config("simclr", seed=9)}
    data = type("Images", (), {"channels": 1, "size": 12, "__len__": lambda self: 4 * 64 + 10})()
    table, load = bench.bench_configs(configs, data, batch=64, steps=2, warmup=1, memory=False,
                                      names=["group", "label"])
    assert len(calls) == 2 and calls[0]["objective"] == "simclr" and shapes == [(1, 12)] * 2
    assert not {"batch_size", "device", "progress"} & set(calls[0])  # the benchmark sets those itself
    assert list(table.index.names) == ["group", "label"] and list(table.columns) == [
        "step_s", "step_iqr_s", "epoch_s", "peak_mem_mb", "params"]
    assert table.loc[("base", "simclr")].equals(table.loc[("engine", "second_order")])  # measured once
    assert table.loc[("base", "simclr"), "epoch_s"] == 1.5 * 4  # 4 full batches of 64 in 266 images
    assert table.loc[("engine", "x")].isna().all()
    assert load == {"load_average": 0.5, "shared": False, "note": f"load average 0.5 on {os.cpu_count()} cores"}


def test_machine_load_flags_a_shared_machine(monkeypatch):
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (1.0, 0.0, 0.0))
    assert bench.machine_load()["shared"] is False
    high = bench.machine_load(before=3.0)  # the busier of before and now counts
    assert high["load_average"] == 3.0 and high["shared"] is True
    assert high["note"] == "load average 3.0 on 2 cores: the machine was shared, these timings are unreliable"


def test_hypergrad_args_reach_the_engine_cases_and_are_checked_first(monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "bench_case", lambda overrides, **kw: seen.append(overrides) or {
        "median_s": 1.0, "iqr_s": 0.0, "peak_mem_mb": 1.0, "params": 1, "views": 2})
    monkeypatch.setattr(bench, "bench_augment", lambda **kw: 0.01)
    record = bench.run(["gessl_aid_neumann"], progress=False, bissl=False,
                       hypergrad_args={"power_iters_warm": None})
    assert "hypergrad_args" not in seen[0]                     # simclr, the reference, has no engine
    assert seen[1]["hypergrad"] == "aid_neumann" and seen[1]["hypergrad_args"] == {"power_iters_warm": None}
    assert record["hypergrad_args"] == {"power_iters_warm": None}
    seen.clear()
    with pytest.raises(ValueError, match=r"^hypergrad_args: unknown second_order option\(s\) \['power_iters'\]"):
        bench.run(["gessl_second_order"], progress=False, bissl=False, hypergrad_args={"power_iters": 3})
    with pytest.raises(ValueError, match="hypergrad_args: none of the cases .* has a hypergradient engine"):
        bench.run(["byol"], progress=False, bissl=False, hypergrad_args={"power_iters": 3})
    assert seen == []                                          # refused before anything was timed
    with pytest.raises(SystemExit):
        bench.main(["--cases", "gessl_aid_neumann", "--hypergrad-args", "{power_iters: 3}"])
