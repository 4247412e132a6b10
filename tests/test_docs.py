"""The documentation cannot drift from the code: every command shown in README.md and docs/*.md
names a script that exists and only options that script takes, and every link between the
pages leads to a file that exists."""

import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))
                               if name.endswith(".md"))


def read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def shown_commands(text):
    """Every `python SCRIPT.py ...` (or `torchrun ... SCRIPT.py ...`) line inside a code block,
    with its continuation lines joined and its comment cut off, and every one quoted inline."""
    commands = []
    inline = re.sub(r"```.*?```", "", text, flags=re.S)
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", inline):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            for part in re.split(r"\s(?:&&|\|)\s", line):
                part = part.strip()
                if re.match(r"(python |torchrun )", part) and not part.startswith("python -"):
                    commands.append(part)
    return commands


def script_and_arguments(command):
    words = shlex.split(command, posix=True)
    scripts = [i for i, word in enumerate(words) if word.endswith(".py")]
    assert scripts, f"no script in {command!r}"
    return words[scripts[0]], words[scripts[0] + 1:]


@functools.lru_cache(maxsize=None)
def help_text(script, subcommand=None):
    arguments = [sys.executable, script] + ([subcommand] if subcommand else []) + ["--help"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(arguments, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    return result.stdout + result.stderr


ALL_COMMANDS = sorted({(page, command) for page in PAGES for command in shown_commands(read(page))})


def test_the_pages_show_commands():
    assert len(ALL_COMMANDS) > 20  # the extraction itself works: the README alone shows dozens


@pytest.mark.parametrize("page,command", ALL_COMMANDS)
def test_every_shown_command_names_a_script_and_options_that_exist(page, command):
    script, arguments = script_and_arguments(command)
    if script.startswith("<"):
        return  # another project's script, by a placeholder path (<llama.cpp>/convert_hf_to_gguf.py)
    assert os.path.isfile(os.path.join(ROOT, script)), f"{page}: {command!r} names {script}, which does not exist"
    options = [word.split("=")[0] for word in arguments if word.startswith("--") and word != "--help"]
    if not options:
        return
    positional = next((word for word in arguments if not word.startswith("-")), None)
    text = help_text(script)
    for option in options:
        pattern = re.escape(option) + r"(?![\w-])"
        if not re.search(pattern, text) and positional and not positional.endswith((".toml", ".bin", ".txt")):
            text = help_text(script, positional)  # a script with subcommands (rag.py index ...)
        assert re.search(pattern, text), f"{page}: {command!r}: {script} has no option {option}"


@pytest.mark.parametrize("page", PAGES)
def test_links_between_pages_lead_to_files_that_exist(page):
    folder = os.path.dirname(os.path.join(ROOT, page))
    for target in re.findall(r"\]\(([^)\s]+)\)", read(page)):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        path = os.path.normpath(os.path.join(folder, target.split("#")[0]))
        assert os.path.exists(path), f"{page} links to {target}, which does not exist"
