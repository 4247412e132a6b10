import json

from conftest import assert_clean_error, run_script


def test_bench_reports_training_generation_and_run_py_side_by_side(tiny_char_data):
    result = run_script("bench.py", "--sections=train,generate,runpy", "--repeats=1", "--new_tokens=5",
                        "--train_steps=15", f"--data_root={tiny_char_data}", "--dataset=tiny", "--device=cpu",
                        "--json")
    report = json.loads(result.stdout)
    figures = {(f["measurement"], f["setting"]): f["value"] for f in report["figures"]}
    measured = {measurement for measurement, _ in figures}
    assert {"train tokens/s", "train peak memory", "sample.py generation", "KV cache speed-up",
            "sample.py tokens/s", "sample.py first token", "run.py tokens/s", "run.py first token",
            "sample.py vs run.py"} <= measured
    assert all(value > 0 for value in figures.values())
    assert ("KV cache speed-up", "ctx 256") in figures and ("KV cache speed-up", "ctx 1024") in figures
    assert "cores" in report["machine"]


def test_bench_refuses_an_unknown_section():
    assert_clean_error(run_script("bench.py", "--sections=everything", check=False))


def test_bench_recipe_reports_loss_and_time_to_target_per_variant(tiny_char_data):
    result = run_script("bench.py", "--sections=recipe", "--recipe_seconds=4",
                        "--recipe_variants=baseline (nanoGPT CPU),+ Muon", f"--data_root={tiny_char_data}",
                        "--recipe_dataset=tiny", "--device=cpu", "--json")
    figures = json.loads(result.stdout)["figures"]
    names = [f["measurement"] for f in figures]
    assert names == ["recipe: baseline (nanoGPT CPU)"] * 2 + ["recipe: + Muon"] * 2
    losses = [f["value"] for f in figures if f["unit"] == "nats"]
    assert all(0 < loss < 5 for loss in losses)  # the tiny corpus's 25 characters: ln 25 = 3.2 at the start
