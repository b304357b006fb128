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
