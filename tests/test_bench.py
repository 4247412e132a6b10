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
            "run.py generation (numpy)", "run.py vs sample.py"} <= measured
    assert all(value > 0 for value in figures.values())
    assert ("KV cache speed-up", "ctx 256") in figures and ("KV cache speed-up", "ctx 1024") in figures
    assert "cores" in report["machine"]


def test_bench_refuses_an_unknown_section():
    assert_clean_error(run_script("bench.py", "--sections=everything", check=False))
