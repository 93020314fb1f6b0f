"""`mlaserve generate` (offline mode): prints what the Engine generates; bad flags name the field."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlaserve.cluster.cli import main
from mlaserve.worker.engine import Engine
from mlaserve.worker.types import SamplingParams


@pytest.fixture(scope="module")
def expected() -> dict[str, str]:
    engine = Engine.from_pretrained("tiny", num_pages=16)
    prompts = ["Hello, MLA", "Paged latents"]
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    return {p: o.text for p, o in zip(prompts, outs)}


def test_streams_the_engines_greedy_text(expected, capsys) -> None:
    code = main(
        [
            "generate",
            "--model",
            "tiny",
            "--num-pages",
            "16",
            "--prompt",
            "Hello, MLA",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--ignore-eos",
            "--stats",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert out == expected["Hello, MLA"] + "\n"
    assert "generated 12" in err and "tokens/s" in err


def test_several_prompts_print_in_order(expected, capsys) -> None:
    code = main(
        [
            "generate",
            "--model",
            "tiny",
            "--num-pages",
            "16",
            "--prompt",
            "Hello, MLA",
            "--prompt",
            "Paged latents",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--ignore-eos",
        ]
    )
    out, _ = capsys.readouterr()
    assert code == 0
    assert out == expected["Hello, MLA"] + "\n\n" + expected["Paged latents"] + "\n"


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--top-p", "0"], "top_p"),
        (["--max-tokens", "0"], "max_tokens"),
        (["--prompt", ""], "prompt"),
        (["--max-tokens", "5000"], "max_tokens"),
    ],
)
def test_bad_input_exits_2_naming_the_field(flags, field, capsys) -> None:
    argv = ["generate", "--model", "tiny", "--num-pages", "128", "--prompt", "hi", *flags]
    if flags[0] == "--prompt":
        argv = ["generate", "--model", "tiny", "--num-pages", "128", *flags]
    assert main(argv) == 2
    assert field in capsys.readouterr().err


def test_console_entry_point() -> None:
    cmd = [
        sys.executable,
        "-c",
        "import sys; from mlaserve.cluster.cli import main; sys.exit(main())",
        "generate",
        "--model",
        "tiny",
        "--num-pages",
        "8",
        "--prompt",
        "hi",
        "--max-tokens",
        "3",
        "--seed",
        "5",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\n")
