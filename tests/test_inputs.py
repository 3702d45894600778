"""Bad input gets a clear error, from the library and from the CLI (exit status 2, one line)."""

import json
import re
import subprocess
import sys

import pytest
from conftest import ENV

from hlm.models import ModelError, PromptError, load_pair, make_pair
from hlm.models.tiny import tiny_model, tiny_tokenizer


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hlm", *args], capture_output=True, text=True, env=ENV, timeout=300)


@pytest.mark.parametrize("prompt", ["", "   \n\t "])
def test_empty_prompt(tiny, prompt):
    with pytest.raises(PromptError, match="empty"):
        tiny.encode_prompt(prompt, 8)


def test_prompt_longer_than_the_context(tiny):
    with pytest.raises(PromptError, match="exceeds the context"):
        tiny.encode_prompt("x" * 2000, 8)
    with pytest.raises(PromptError, match="characters"):
        tiny.encode_prompt("x" * 200_000, 8)


def test_unknown_preset():
    with pytest.raises(ModelError, match="unknown model pair"):
        load_pair("nonexistent-preset")


def test_mismatched_vocabularies_are_refused():
    other = tiny_tokenizer(specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra>"))
    with pytest.raises(ModelError, match="different vocabularies"):
        make_pair("bad", tiny_model(1), tiny_model(2), tiny_tokenizer(), other)
    with pytest.raises(ModelError, match="vocabulary sizes differ"):
        make_pair("bad", tiny_model(1), tiny_model(2, vocab_size=300), tiny_tokenizer(), tiny_tokenizer())


@pytest.mark.parametrize("args,message", [
    (["--prompt", "  "], "prompt is empty"),
    (["--prompt", "hi", "--k", "0"], "k must be"),
    (["--prompt", "hi", "--gamma", "-1"], "gamma must be"),
    (["--prompt", "hi", "--u-th", "1.5"], "u_th must be"),
    (["--prompt", "hi", "--models", "nope"], "unknown model pair"),
    (["--prompt", "hi", "--bits-per-prob", "12"], "bits_per_prob"),
])
def test_cli_bad_input_exits_2_with_one_line(args, message):
    out = cli("generate", "--models", "tiny", *args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1



@pytest.mark.parametrize("command", ["calibrate", "study", "sweep"])
def test_a_malformed_prompt_file_is_one_line_for_every_command(command, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\nnot json\n', encoding="utf-8")
    out = cli(command, "--models", "tiny", "--prompts", str(bad), *(["--out", str(tmp_path / "o")]
                                                                    if command != "calibrate" else []))
    assert out.returncode == 2, out.stderr
    assert f"{bad}:2: not JSON" in out.stderr and "Traceback" not in out.stderr

def test_cli_json_output():
    out = cli("generate", "--models", "tiny", "--prompt", "hello", "--max-new-tokens", "12", "--policy", "ours",
              "--u-th", "0.2", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) >= {"text", "tokens", "summary"}
    assert len(data["tokens"]) == data["summary"]["tokens"] <= 12
    assert data["text"] == "".join(t["text"] for t in data["tokens"])
    assert {"source", "u", "importance", "importance_threshold", "uploaded", "bits_up", "energy_j",
            "energy_method"} <= set(data["tokens"][0])


def test_every_fixable_error_is_a_user_error():
    """One base, so each front end reports them alike (CLI exit 2, the page's notice); the runtime ones stay
    RuntimeErrors for code that catches those."""
    from hlm.cli import UsageError
    from hlm.config import ConfigError
    from hlm.dashboard import USER_ERRORS
    from hlm.errors import UserError
    from hlm.experiments.quality import QualityError
    from hlm.models.embedded import EmbeddedModelError

    for error in (ConfigError, PromptError, ModelError, EmbeddedModelError, QualityError, UsageError):
        assert issubclass(error, UserError), error
    assert all(issubclass(e, RuntimeError) for e in (ModelError, EmbeddedModelError, QualityError))
    assert UserError in USER_ERRORS


def test_the_page_on_a_port_in_use_moves_to_a_free_one_and_says_where():
    """Gradio tries the next ports when the one asked for is taken, and prints the address it serves on."""
    import socket
    import time
    from pathlib import Path

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = subprocess.Popen([sys.executable, "app.py", "--models", "tiny"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).resolve().parent.parent,
                               env={**ENV, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
                                    "GRADIO_ANALYTICS_ENABLED": "False"})
        try:
            deadline, said = time.monotonic() + 240, ""
            while "Running on local URL" not in said and app.poll() is None and time.monotonic() < deadline:
                said = app.stdout.readline()
        finally:
            app.terminate()
            app.wait(30)
    served = re.search(r"http://127\.0\.0\.1:(\d+)", said)
    assert served and int(served.group(1)) != port, said
