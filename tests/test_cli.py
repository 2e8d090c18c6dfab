"""`awq-edge quantize` / `awq-edge eval`: an end-to-end run on a tiny model, and every error path
printing exactly one line, with no traceback and nothing left behind."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from awq_edge.cli import main
from tiny_models import tiny_model

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _save_model_dir(model, folder: Path, tokenizer_src: Path) -> Path:
    model.half().save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_src / name).is_file():
            shutil.copy2(tokenizer_src / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_fp16) -> Path:
    """A tiny Llama with SmolLM2's tokenizer (so the vocabulary sizes agree), as an FP16 HF folder."""
    model, _ = tiny_model("llama", vocab_size=49152)
    return _save_model_dir(model, tmp_path_factory.mktemp("tiny") / "llama", smollm2_fp16)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory, shared_dir) -> Path:
    src = shared_dir / "data" / "calib" / "calib_mix_v1.jsonl"
    f = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    f.write_text("".join(src.open().readlines()[:3]))
    return f


def run_cli(capfd, *argv) -> tuple[int, str, str]:
    capfd.readouterr()  # drop what earlier steps printed
    rc = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_quantize_then_eval_end_to_end(tmp_path, capfd, tiny_dir, calib_file):
    from awq_edge import load_awq_model
    from awq_edge.calib import load_calibration
    from awq_edge.evaluate import eval_tokens, perplexity

    out = tmp_path / "ck"
    rc, stdout, err = run_cli(capfd, "quantize", tiny_dir, "--out", out, "--group-size", 64, "--calib", calib_file,
                              "--calib-samples", 4, "--calib-seqlen", 64, "--device", "cpu")
    assert rc == 0, err
    assert "time" in stdout and "peak CPU RSS" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == 4 and cfg["quantization_config"]["group_size"] == 64

    data = tmp_path / "text.raw"
    data.write_text(" = Valkyria = \n\n" + " The game was released in Japan in 2011 and sold well .\n" * 40)
    js = tmp_path / "ppl.json"
    rc, stdout, err = run_cli(capfd, "eval", out, "--ppl", "--data", data, "--seqlen", 64, "--windows", 3,
                              "--device", "cpu", "--json", js)
    assert rc == 0, err
    got = json.loads(js.read_text())
    assert got["windows"] == 3 and math.isfinite(got["ppl"])
    # Same number as evaluating the loaded checkpoint directly.
    model = load_awq_model(out, dtype=torch.float32)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ref = perplexity(model, eval_tokens(tok, data), seqlen=64, windows=3, progress=False)
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-6)

    # The calibration the CLI used is the published protocol: docs in file order, no special tokens.
    ids = load_calibration(calib_file, tok, 4, 64)
    docs = [json.loads(line)["text"] for line in calib_file.read_text().splitlines()]
    flat = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"]]
    assert ids.flatten().tolist() == flat[: 4 * 64]

    # --force replaces; RTN needs no calibration file.
    rc, _, err = run_cli(capfd, "quantize", tiny_dir, "--out", out, "--group-size", 32, "--w-bit", 3,
                         "--method", "rtn", "--calib", tmp_path / "absent.jsonl", "--device", "cpu", "--force")
    assert_one_line_error(rc, err, "absent.jsonl")  # an explicitly named file must exist even for rtn
    rc, _, err = run_cli(capfd, "quantize", tiny_dir, "--out", out, "--group-size", 32, "--w-bit", 3,
                         "--method", "rtn", "--device", "cpu", "--force")
    assert rc == 0, err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"]) == (3, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "ppl.json", "text.raw"]


@pytest.fixture(scope="module")
def odd_width_dir(tmp_path_factory, smollm2_fp16) -> Path:
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=1,
                         num_attention_heads=3, num_key_value_heads=3)
    return _save_model_dir(tf.LlamaForCausalLM(cfg), tmp_path_factory.mktemp("odd") / "m", smollm2_fp16)


def _bad_dirs(tmp_path: Path, tiny_dir: Path) -> dict[str, Path]:
    tmp_path.mkdir(parents=True)
    unknown = tmp_path / "bert"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    alien = tmp_path / "alien"
    alien.mkdir()
    (alien / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_dir, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 1000])
    empty = tmp_path / "empty"
    empty.mkdir()
    notgguf = tmp_path / "model.bin"
    notgguf.write_bytes(b"\0" * 16)
    return {"unknown": unknown, "alien": alien, "broken": broken, "truncated": truncated, "empty": empty,
            "notgguf": notgguf}


@pytest.mark.parametrize(
    "case,extra,needles",
    [
        ("unknown", [], ["unknown architecture 'bert'"]),
        ("alien", [], ["config.json", "no_such_arch"]),
        ("broken", [], ["config.json", "not valid JSON"]),
        ("truncated", [], ["model.safetensors", "truncated"]),
        ("empty", [], ["config.json", "missing"]),
        ("notgguf", [], ["model.bin", ".gguf"]),
        ("odd", ["--group-size", "64"], ["--group-size 64", "in_features = 96"]),
        ("tiny", ["--calib", "/nonexistent/calib.jsonl"], ["/nonexistent/calib.jsonl", "not found"]),
        ("tiny", ["--w-bit", "5"], ["--w-bit 5"]),
        ("tiny", ["--group-size", "48"], ["--group-size 48"]),
        ("tiny", ["--method", "gptq"], ["--method"]),
        ("nothing", [], ["no such model"]),
    ],
)
def test_quantize_errors_one_line_no_output(case, extra, needles, tmp_path, capfd, tiny_dir, odd_width_dir, calib_file):
    dirs = _bad_dirs(tmp_path / "in", tiny_dir)
    dirs.update(tiny=tiny_dir, odd=odd_width_dir, nothing=tmp_path / "nothing")
    work = tmp_path / "work"
    work.mkdir()
    argv = ["quantize", dirs[case], "--out", work / "out", "--device", "cpu"]
    if "--calib" not in extra:
        argv += ["--calib", calib_file]
    rc, _, err = run_cli(capfd, *argv, *extra)
    assert_one_line_error(rc, err, *needles)
    assert list(work.iterdir()) == []  # no output, no temp folder


def test_quantize_refuses_non_empty_out(tmp_path, capfd, tiny_dir, calib_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    rc, _, err = run_cli(capfd, "quantize", tiny_dir, "--out", out, "--calib", calib_file, "--device", "cpu")
    assert_one_line_error(rc, err, "--force")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_calibration_too_short(tmp_path, capfd, tiny_dir):
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    rc, _, err = run_cli(capfd, "quantize", tiny_dir, "--out", tmp_path / "out", "--calib", short,
                         "--calib-samples", 2, "--calib-seqlen", 64, "--device", "cpu")
    assert_one_line_error(rc, err, "too little calibration text")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


def test_eval_errors_one_line(tmp_path, capfd, tiny_dir):
    rc, _, err = run_cli(capfd, "eval", tmp_path / "absent", "--device", "cpu")
    assert_one_line_error(rc, err, "absent")
    rc, _, err = run_cli(capfd, "eval", tiny_dir, "--data", tmp_path / "absent.raw", "--device", "cpu")
    assert_one_line_error(rc, err, "absent.raw", "not found")


def test_real_cli_process_truncated_safetensors(tmp_path, tiny_dir, calib_file):
    """The installed entry point, as a user runs it: one stderr line, exit code 2."""
    bad = _bad_dirs(tmp_path / "in", tiny_dir)["truncated"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "awq_edge.cli", "quantize", str(bad), "--out", str(tmp_path / "out"),
                        "--calib", str(calib_file), "--device", "cpu"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert_one_line_error(p.returncode, p.stderr, "model.safetensors", "truncated")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family,method", [("qwen2_5_vl", "rtn"), ("gemma3", "rtn"), ("opt", "awq")])
def test_quantize_and_eval_other_families(family, method, tmp_path, capfd, smollm2_fp16, calib_file):
    """Every family goes through the CLI: folder -> checkpoint -> eval (the AWQ search itself is
    covered per family by tests/test_awq_core.py)."""
    model, _ = tiny_model(family)
    model.resize_token_embeddings(49152)  # SmolLM2's tokenizer drives the CLI
    src = _save_model_dir(model, tmp_path / "src", smollm2_fp16)
    out = tmp_path / "ck"
    rc, _, err = run_cli(capfd, "quantize", src, "--out", out, "--group-size", 64, "--method", method,
                         "--calib", calib_file, "--calib-samples", 2, "--calib-seqlen", 32, "--device", "cpu")
    assert rc == 0, err
    data = tmp_path / "text.raw"
    data.write_text(" The game was released in Japan in 2011 and sold well .\n" * 20)
    js = tmp_path / "ppl.json"
    rc, _, err = run_cli(capfd, "eval", out, "--data", data, "--seqlen", 32, "--windows", 2, "--device", "cpu", "--json", js)
    assert rc == 0, err
    assert math.isfinite(json.loads(js.read_text())["ppl"])
