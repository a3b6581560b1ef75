"""Bad export input: one clear line on stderr, exit != 0, nothing written or overwritten."""

from __future__ import annotations

import pytest

from conftest import run_cli


@pytest.mark.parametrize("args, message", [
    (["no-such-model"], "unknown model"),
    (["tiny-bert", "--trainable", "lora,wings"], "bad --trainable"),
    (["tiny-bert", "--trainable", "full,lora"], "use it alone"),
    (["tiny-bert", "--quant", "int3"], "bad --quant"),
    (["tiny-bert", "--target", "toaster"], "bad --target"),
    (["tiny-bert", "--task", "dance"], "bad --task"),
    (["tiny-bert", "--quant", "int4"], "for decoder models"),
    (["tiny-bert", "--task", "lm", "--trainable", "lora"], "needs a decoder"),
    (["tiny-llama", "--prompt", "no placeholder"], "must contain {sentence}"),
    (["tiny-llama", "--labels", "a,b,c", "--label-words", " x, y"], "words for 3 labels"),
    (["tiny-bert", "--lora-targets", "nonexistent"], "no module"),
    (["tiny-bert", "--calibration", "/no/such/file.tsv", "--quant", "int8-static"], "no such file"),
    (["tiny-bert", "--max-length", "100000"], "max-length"),
    (["tiny-bert", "--quant", "int8", "--quant-exclude", "(unclosed"], "bad --quant-exclude"),
    (["tiny-bert", "--format", "pdf"], "bad --format"),
    (["tiny-bert", "--copies", "3"], "bad --copies"),
    (["tiny-bert", "--copies", "4", "--trainable", "bias"], "bad --copies"),
])
def test_bad_export_input(tmp_path, args, message):
    out = tmp_path / "out"
    p = run_cli("export", *args, "--out", out)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("zoedge: error:")]
    assert len(lines) == 1 and message in lines[0], p.stderr[-2000:]
    assert not out.exists()
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".out.")], "temporary directory left behind"


def test_non_empty_out_is_refused_and_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "precious.txt"
    keep.write_text("do not delete")
    p = run_cli("export", "tiny-bert", "--out", out)
    assert p.returncode != 0 and "not empty" in p.stderr
    assert keep.read_text() == "do not delete"


def test_bad_bundle_for_verify_and_inspect(tmp_path):
    for cmd in ("verify", "inspect"):
        p = run_cli(cmd, tmp_path)
        assert p.returncode != 0 and "not a zoedge bundle" in p.stderr


def test_help_lists_commands():
    p = run_cli("--help", check=True)
    for cmd in ("export", "verify", "inspect"):
        assert cmd in p.stdout
