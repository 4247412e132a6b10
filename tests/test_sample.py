import pytest

from conftest import TINY_MODEL, assert_clean_error, run_script


@pytest.fixture
def trained(tiny_char_data, tmp_path):
    out_dir = tmp_path / "out"
    run_script("train.py", *TINY_MODEL, f"--data_root={tiny_char_data}", "--dataset=tiny",
               f"--out_dir={out_dir}", "--max_iters=60", "--eval_interval=60", "--learning_rate=3e-3")
    return out_dir


def test_same_seed_same_text_and_another_seed_other_text(trained):
    args = ["sample.py", f"--out_dir={trained}", "--prompt=alpha ", "--max_new_tokens=80", "--device=cpu"]
    first, second = run_script(*args, "--seed=1"), run_script(*args, "--seed=1")
    other = run_script(*args, "--seed=2")
    assert first.stdout == second.stdout
    assert first.stdout != other.stdout
    assert first.stdout.startswith("alpha ") and len(first.stdout) > 60
    assert "tokens/s" in first.stderr and "tokens/s" not in first.stdout  # diagnostics on stderr


def test_greedy_text_is_the_same_with_and_without_the_kv_cache(trained):
    args = ["sample.py", f"--out_dir={trained}", "--prompt=delta ", "--max_new_tokens=25",
            "--temperature=0", "--device=cpu"]  # 6 + 25 tokens stay inside the 32-token context
    assert run_script(*args).stdout == run_script(*args, "--kv_cache=false").stdout


def test_num_samples_and_prompt_from_a_file(trained, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("echo golf " * 10)  # 100 characters: longer than the context, cropped from the left
    result = run_script("sample.py", f"--out_dir={trained}", f"--prompt=FILE:{prompt}", "--num_samples=3",
                        "--max_new_tokens=20", "--top_k=5", "--top_p=0.9", "--device=cpu")
    assert result.stdout.count("---------------") == 2
    assert "cropped" in result.stderr


def test_bad_sampling_input_is_refused_clearly(trained, tmp_path):
    assert_clean_error(run_script("sample.py", f"--out_dir={trained}", "--prompt=ALPHA", check=False))  # unseen chars
    assert_clean_error(run_script("sample.py", f"--out_dir={trained}", "--prompt=FILE:/no/such/file", check=False))
    assert_clean_error(run_script("sample.py", f"--out_dir={tmp_path / 'nothing'}", check=False))
    assert_clean_error(run_script("sample.py", f"--out_dir={trained}", "--temperature=hot", check=False))
    assert_clean_error(run_script("sample.py", f"--out_dir={trained}", "--top_p=2", check=False))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((trained / "ckpt.pt").read_bytes()[:5000])
    assert_clean_error(run_script("sample.py", f"--out_dir={truncated}", check=False))


def test_dtype_chooses_the_weights_precision(trained):
    args = ["sample.py", f"--out_dir={trained}", "--prompt=delta ", "--max_new_tokens=10", "--temperature=0",
            "--device=cpu"]
    assert run_script(*args, "--dtype=bfloat16").stdout.startswith("delta ")
    assert_clean_error(run_script(*args, "--dtype=float8", check=False))


def test_no_prompt_continues_the_prompt_training_sampled_from(tiny_char_data, tmp_path):
    out_dir = tmp_path / "out"
    run_script("train.py", *TINY_MODEL, f"--data_root={tiny_char_data}", "--dataset=tiny", f"--out_dir={out_dir}",
               "--max_iters=2", "--eval_interval=2", "--sample_prompt=golf ")
    args = ["sample.py", f"--out_dir={out_dir}", "--max_new_tokens=5", "--device=cpu"]
    assert run_script(*args).stdout.startswith("golf ")
    assert run_script(*args, "--prompt=hotel ").stdout.startswith("hotel ")
