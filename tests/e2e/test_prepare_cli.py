"""`python -m launcher.prepare` exactly as users type it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.prepare", "logging.progress=false", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_glob_and_list_inputs_prepare_the_same_shards(tmp_path):
    for i in range(3):
        (tmp_path / f"w{i}_gut.txt").write_text(f"Work number {i}.\nTo be, or not to be. " * (20 + i))
    files = sorted(str(p) for p in tmp_path.glob("*_gut.txt"))
    glob = run(f"prepare.input={tmp_path}/*_gut.txt", "prepare.format=text", f"prepare.output={tmp_path}/g",
               "tokenizer.vocab_size=300")
    assert glob.returncode == 0, glob.stderr
    assert "prepared 3 documents" in glob.stdout and "tokens/s" in glob.stdout
    listed = run(f"prepare.input=[{','.join(files)}]", f"prepare.output={tmp_path}/l", "tokenizer.vocab_size=300")
    assert listed.returncode == 0, listed.stderr
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert manifest["documents"] == 3 and manifest["tokenizer"]["vocab_size"] <= 300
    for name in ["manifest.json", "tokenizer.json"] + [s["name"] for s in manifest["shards"]]:
        assert (tmp_path / "g" / name).read_bytes() == (tmp_path / "l" / name).read_bytes()


def test_bad_input_exits_nonzero_naming_the_problem(tmp_path):
    result = run(f"prepare.input={tmp_path}/none/*.txt", f"prepare.output={tmp_path}/out")
    assert result.returncode != 0
    assert f"prepare.input entry '{tmp_path}/none/*.txt' matches no file" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_output_dir_with_a_foreign_manifest_is_refused_and_left_untouched(tmp_path):
    (tmp_path / "a.txt").write_text("To be, or not to be. " * 20)
    app = tmp_path / "webapp"
    app.mkdir()
    (app / "manifest.json").write_text('{"name": "my web app", "version": 1}')
    (app / "index.html").write_text("<html>mine</html>")
    before = {p.name: p.read_bytes() for p in app.iterdir()}
    result = run(f"prepare.input={tmp_path}/a.txt", f"prepare.output={app}", "tokenizer.vocab_size=300")
    assert result.returncode == 2, result.stderr
    assert f"prepare.output={app} exists and is not a megatrain prepared dataset" in result.stderr
    assert {p.name: p.read_bytes() for p in app.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "webapp"]  # no temporary directory left
    # a directory prepare wrote carries the marker, so a rerun may replace it
    out = tmp_path / "data"
    for _ in range(2):
        assert run(f"prepare.input={tmp_path}/a.txt", f"prepare.output={out}",
                   "tokenizer.vocab_size=300").returncode == 0
    assert json.loads((out / "manifest.json").read_text())["format"] == "megatrain-prepared-dataset"


def test_a_document_longer_than_a_piece_is_tokenized_in_pieces_with_the_same_tokens(tiny_data, tmp_path):
    import pyarrow as pa
    from tokenizers import Tokenizer

    from megatrain.data.preprocess import PIECE_CHARS

    words = "To be, or not to be, that is the question:\tWhether 'tis nobler  in the mind to suffer".split(" ")
    text = " ".join(words[i % len(words)] for i in range(PIECE_CHARS // 4))  # one line, ~1.2 pieces
    assert len(text) > PIECE_CHARS
    (tmp_path / "long.txt").write_text(text)
    result = run(f"prepare.input={tmp_path}/long.txt", f"prepare.output={tmp_path}/out",
                 f"tokenizer.path={tiny_data}/tokenizer.json")
    assert result.returncode == 0, result.stderr
    assert "1 document(s) longer than" in result.stderr
    assert "the tokens are those of the whole document" in result.stderr
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    [row] = pa.ipc.open_file(str(tmp_path / "out" / "shard_00000.arrow")).read_all().column(0).to_pylist()
    assert row[:-1] == tok.encode(text, add_special_tokens=False).ids  # EOD last
