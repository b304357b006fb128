"""outputs/index.md and index.html: one section per notebook, metrics table, verdicts, figures, run time."""

import json

from bilevel_ssl.index import build, metrics_table


def _run(root, notebook, profile, record, figures=()):
    folder = root / notebook / profile
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(record))
    for f in figures:
        (folder / f).write_bytes(b"\x89PNG")
    return folder


def test_index_has_a_section_per_notebook_with_table_verdicts_and_figures(tmp_path):
    _run(tmp_path, "10_gessl", "default",
         {"results": {"simclr": {"knn_acc": 0.7123, "linear_acc": 0.8, "note": "x"},
                      "simclr+gessl": {"knn_acc": 0.65, "linear_acc": 0.81}},
          "verdicts": {"R1 GeSSL improves linear": "does not hold at this scale"},
          "wall_time_s": 1234.4, "machine": {"processor": "x86_64", "cpus": 2}, "git_sha": "abcdef1234567890"},
         figures=["fig_tsne.png"])
    _run(tmp_path, "10_gessl", "smoke", {"results": {"simclr": {"knn_acc": 0.5}}, "wall_time_s": 9})
    _run(tmp_path, "11_gessl", "default", {"results": {"simclr": {"knn_acc": 0.5}}, "wall_time_s": 631,
                                           "training_runs": {"trained": 2, "from_cache": 22,
                                                             "from_cache_train_s": 4012.4}})
    _run(tmp_path, "00_quickstart", "default", {"results": {"accuracy": 0.9}, "wall_time_s": 48,
                                                   "training_runs": {"trained": 0, "from_cache": 21}})
    _run(tmp_path, "01_zoo", "default", {"results": {"accuracy": 0.7}, "wall_time_s": 2546,  # trains outside the cache
                                         "training_runs": {"trained": 0, "from_cache": 0, "from_cache_train_s": 0.0}})
    (tmp_path / "cache" / "simclr-none-abc").mkdir(parents=True)
    (tmp_path / "cache" / "simclr-none-abc" / "metrics.json").write_text("{}")
    md_path, html_path = build(tmp_path)
    md = md_path.read_text()
    assert md.index("## 00_quickstart") < md.index("## 10_gessl")
    assert "### smoke" not in md  # smoke runs are not committed: their own index
    smoke = (tmp_path / "index-smoke.md").read_text()
    assert "### smoke" in smoke and "| simclr | 0.500 |" in smoke and "00_quickstart" not in smoke
    assert "| simclr | 0.712 | 0.800 |" in md and "| simclr+gessl | 0.650 | 0.810 |" in md
    assert "**R1 GeSSL improves linear**: does not hold at this scale" in md
    assert "run time 1234 s;" in md and "git abcdef123456" in md  # no training_runs recorded: none claimed
    assert "run time 48 s (pre-training runs through the encoder cache: 0 trained here, 21 loaded)" in md
    assert "run time 2546 s; machine" in md  # nothing through the cache: no "0 trained here" for a run that trained
    assert ("run time 631 s (pre-training runs through the encoder cache: 2 trained here, 22 loaded, whose training "
            "took 4012 s where they were made)") in md
    assert "[fig_tsne.png](10_gessl/default/fig_tsne.png)" in md
    assert "| accuracy | 0.900 |" in md
    assert "cache" not in md.split("## ")[1:][0]
    page = html_path.read_text()
    assert "<img src='10_gessl/default/fig_tsne.png'" in page and "<td>0.712</td>" in page


def test_index_columns_choose_and_order_the_table():
    header, rows = metrics_table({"results": {"a": {"x": 1.0, "y": 2.0, "z": 3.0}}, "index_columns": ["z", "x"]})
    assert header == ["", "z", "x"] and rows == [["a", "3.000", "1.000"]]


def test_empty_outputs_say_how_to_make_them(tmp_path):
    md_path, _ = build(tmp_path)
    assert "make reproduce" in md_path.read_text()


def test_committed_profiles_are_ordered_most_complete_first(tmp_path):
    for p in ("default", "gpu", "paper"):
        _run(tmp_path, "10_gessl", p, {"results": {"simclr": {"knn_acc": 0.5}}})
    md = build(tmp_path)[0].read_text()
    assert md.index("### paper") < md.index("### gpu") < md.index("### default")


def test_readme_blocks_are_generated_from_the_metrics(tmp_path):
    from bilevel_ssl.index import readme_block, render_readme

    claim = {"label": "supported", "reason": "1 of 1 primary comparisons supported, none contradicted",
             "comparisons": [{"comparison": "A > B: knn_acc", "primary": True, "mean": 0.0512, "ci_low": 0.01,
                              "ci_high": 0.09, "ci_level": 0.95, "mde": 0.03, "n": 5, "label": "supported"},
                             {"comparison": "A > B: S_gen", "primary": False, "mean": 0.1, "n": 5}]}
    _run(tmp_path, "10_gessl", "gpu", {"results": {"simclr": {"knn_acc": 0.75}}, "claims": {"R1": claim},
                                       "learning_check": {"metric": "knn_acc", "margin": 0.1, "ok": True,
                                                          "bases": {"simclr": {"trained": 0.8, "untrained": 0.65,
                                                                               "gain": 0.15}}},
                                       "lr_used": 0.1,
                                       "lr_selection": {"option": "gessl_args.inner_lr", "values": [0.01, 0.1],
                                                        "scores": [0.77, float("nan")], "chosen": 0.01, "metric": "knn_acc",
                                                        "fit_images": 1600, "validation_images": 400, "seed": 0}})
    block = readme_block("10_gessl", "gpu", tmp_path)
    assert ("**gessl_args.inner_lr chosen on validation**: 0.01 (5-NN on a validation split of the training classes - "
            "400 images held out of the 2000 training images, never the test split; one run per value, seed 0: "
            "0.01: 0.770, 0.1: diverged). The runs of this profile use 0.1: **not** the validation choice (0.01); set it in "
            "the params to follow the protocol.") in block  # NaN: a diverged candidate; lr_used: what the runs used
    assert "| simclr | 0.750 |" in block
    assert "simclr 0.800 vs untrained 0.650 (+0.150) — passed." in block
    assert ("**R1: supported** (1 of 1 primary comparisons supported, none contradicted). Primary comparisons "
            "(mean A − B): A > B: knn_acc: +0.051 (CI [+0.010, +0.090] at 95.0%, MDE 0.030, n = 5; supported).") in block
    assert "S_gen" not in block  # secondary comparisons stay in the notebook
    md, page = (path.read_text() for path in build(tmp_path))  # the index shows the same two lines
    assert "simclr 0.800 vs untrained 0.650 (+0.150) — passed." in md and "0.01: 0.770, 0.1: diverged" in md
    assert "<p>gessl_args.inner_lr chosen on validation: 0.01 (5-NN" in page
    text = "intro\n<!-- results 10_gessl gpu -->\nstale 0.123\n<!-- /results -->\nafter\n"
    new = render_readme(text, tmp_path)
    assert "stale" not in new and "| simclr | 0.750 |" in new and new.endswith("<!-- /results -->\nafter\n")
    assert render_readme(new, tmp_path) == new  # stable
    missing = render_readme("<!-- results 99_x default -->\n<!-- /results -->", tmp_path)
    assert "No committed `default` run of 99_x yet" in missing


def test_a_run_whose_params_file_changed_since_is_marked_stale_naming_the_changed_keys(tmp_path):
    from bilevel_ssl.index import readme_block

    outputs, params = tmp_path / "outputs", tmp_path / "params" / "default"
    params.mkdir(parents=True)
    run_params = {"epochs": 20, "gessl_args": {"m": 8, "mu": 0.7}, "seeds": [0, 1, 2], "profile": "default"}
    _run(outputs, "11_x", "default", {"params": run_params, "results": {"gessl": {"knn_acc": 0.7}}})
    (params / "11_x.yaml").write_text("epochs: 20\ngessl_args: {m: 8, mu: 0.7}\nseeds: [0, 1, 2]\n")
    assert "Stale" not in readme_block("11_x", "default", outputs)  # yaml lists == json lists: same run
    (params / "11_x.yaml").write_text("epochs: 20\ngessl_args: {m: 8, mu: 0.7, inner_lr: 0.01}\nseeds: [0, 1]\n")
    block = readme_block("11_x", "default", outputs)
    assert block.startswith("**Stale: `params/default/11_x.yaml` changed after this run** "
                            "(`gessl_args.inner_lr` unset → 0.01; `seeds` [0, 1, 2] → [0, 1]).")
    assert "`epochs`" not in block and "| gessl | 0.700 |" in block  # unchanged keys not named; numbers kept
    assert "Stale" not in readme_block("11_x", "gpu", outputs)  # no params file for that profile: nothing to compare
    md, page = build(outputs)
    assert "**Stale: `params/default/11_x.yaml` changed after this run**" in md.read_text()
    assert "Stale: params/default/11_x.yaml changed" in page.read_text()


def test_readme_block_shows_benchmark_targets_with_the_load(tmp_path):
    from bilevel_ssl.index import readme_block
    _run(tmp_path, "90_bench", "default", {
        "results": {"simclr": {"median_s": 0.5}}, "load_average": [0.73, 2.01],
        "targets": {"gessl_second_order": {"ratio": 3.7217, "target": 3.5, "met": False},
                    "augment_share": {"ratio": 0.01963, "target": 0.05, "met": True}}})
    block = readme_block("90_bench", "default", tmp_path)
    assert ("Targets (load average 0.7–2.0 during the run): gessl_second_order 3.72 vs ≤ 3.5 (**not met**); "
            "augment_share 0.0196 vs ≤ 0.05 (met).") in block
    _run(tmp_path, "91_x", "default", {"results": {"simclr": {"median_s": 0.5}}})
    assert "Targets" not in readme_block("91_x", "default", tmp_path)


def test_budget_block_brackets_make_reproduce_from_the_committed_run_times(tmp_path):
    from bilevel_ssl.index import budget_block, render_readme

    outputs = tmp_path / "outputs"
    (tmp_path / "notebooks").mkdir()
    for nb in ("00_a", "10_b", "11_c", "12_d", "13_e", "99_never"):
        (tmp_path / "notebooks" / f"{nb}.ipynb").write_text("{}")
    _run(outputs, "00_a", "default", {"wall_time_s": 150.0, "git_sha": "abcdef123456", "written": "2026-12-07T20:32",
                                      "machine": {"cpus": 2, "torch_threads": 2, "cpu_capability": "AVX512"},
                                      "training_runs": {"trained": 0, "from_cache": 0, "from_cache_train_s": 0.0}})
    _run(outputs, "10_b", "default", {"wall_time_s": 1200.0, "training_runs": {"trained": 6, "from_cache": 0,
                                                                               "from_cache_train_s": 0.0}})
    # made from a full cache: 2 min of notebook, 30 min of training loaded
    _run(outputs, "11_c", "default", {"wall_time_s": 120.0, "training_runs": {"trained": 0, "from_cache": 9,
                                                                              "from_cache_train_s": 1800.0}})
    _run(outputs, "12_d", "default", {"wall_time_s": 600.0, "training_runs": {"trained": 2, "from_cache": 22}})
    _run(outputs, "13_e", "default", {"wall_time_s": 60.0})  # before training_runs existed
    _run(outputs, "10_b", "smoke", {"wall_time_s": 9999.0})  # another profile: not counted
    block = budget_block("default", outputs)
    assert "| 00_a | 2 min 30 s | – (trains outside the cache) | – | 2 min 30 s | 2 CPUs, 2 threads, AVX512 | abcdef1 | 2026-12-07 |" in block
    assert "| 10_b | 20 min | 6 / 0 | – | 20 min |" in block
    assert "| 11_c | 2 min | 0 / 9 | 30 min | 32 min |" in block
    assert "| 12_d | 10 min | 2 / 22 | not recorded | 10 min or more |" in block
    assert "| 13_e | 1 min | not recorded | not recorded | 1 min or more |" in block
    # run times 150 + 1200 + 120 + 600 + 60 = 2130 s; empty cache + 1800 s = 3930 s
    assert "| **sum** | **36 min** (0.6 h) |  |  | **66 min** (1.1 h) or more |  |  |  |" in block
    assert ("\"or more\": 12_d (loaded 22 runs without recording their training time); 13_e (recorded no "
            "`training_runs`).") in block
    assert "No committed run: 99_never." in block
    assert "One `make reproduce` in order" not in block  # no record names its runs: nothing to count once
    _run(outputs, "14_f", "default", {"wall_time_s": 900.0, "training_runs": {
        "trained": 1, "from_cache": 1, "from_cache_train_s": 1200.0,  # loads 10_b's base, trains one run of 300 s
        "runs": {"base": {"train_s": 1200.0, "loaded": True}, "own": {"train_s": 300.0, "loaded": False}}}})
    block = budget_block("default", outputs)
    assert "| 14_f | 15 min | 1 / 1 | 20 min | 35 min |" in block
    # 10_b named no runs, so its base counts in it and again in 14_f: 3930 + 600 + 300 + 1200 = 6030 s
    assert ("One `make reproduce` in order, each pre-training run that notebooks share trained once: **100 min** "
            "(1.7 h; `bilevel_ssl.reproduce.plan_estimate_s`). It knows the shared runs of the 1 of 6 notebook runs") in block
    text = "a\n<!-- budget default -->\nhand-written 595 min\n<!-- /budget -->\nb\n"
    new = render_readme(text, outputs)
    assert "hand-written" not in new and "| 11_c |" in new and new.endswith("<!-- /budget -->\nb\n")
    assert render_readme(new, outputs) == new
    assert "No committed `gpu` run yet" in budget_block("gpu", outputs)
