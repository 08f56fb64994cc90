"""SentencePiece tokenizer: training on real text, round trips, stable special ids, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from data_fixtures import REPO, stdlib_files, tokenizer_dir

from data import Tokenizer, train_tokenizer
from data.tokenizer import padded_size


def test_round_trip_on_real_text():
    tok = Tokenizer.load(tokenizer_dir())
    texts = [open(f, encoding="utf-8").read() for f in stdlib_files(5, skip=70)]  # unseen
    texts.append("Ünïcödé 日本語 emoji \U0001f600, tabs\t\tand  spaces\n\n\x00 end ")
    ids = tok.encode(texts)
    assert isinstance(ids, list) and all(isinstance(x, list) for x in ids)
    assert tok.decode(ids) == texts
    for t, x in zip(texts, ids):
        assert tok.decode(x) == t
        assert max(x) < tok.vocab_size
    # code compresses: far fewer tokens than bytes
    assert sum(map(len, ids[:-1])) < 0.6 * sum(len(t.encode()) for t in texts[:-1])
    # tensors and numpy arrays decode too; special ids are dropped
    one = torch.tensor([tok.bos_id] + ids[0][:50] + [tok.eos_id, tok.pad_id])
    assert tok.decode(one) == tok.decode(ids[0][:50])
    assert tok.decode(torch.tensor([ids[0][:9], ids[1][:9]])) == [tok.decode(ids[0][:9]),
                                                                  tok.decode(ids[1][:9])]


def test_special_ids_fixed_and_stable_across_save_load(tmp_path):
    tok = Tokenizer.load(tokenizer_dir())
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 512 and tok.padded_vocab_size == 512
    text = "def f(x):\n    return x + 1\n"
    assert tok.encode(text, add_bos=True, add_eos=True) == [1, *tok.encode(text), 2]
    tok.save_to(str(tmp_path / "copy"))
    again = Tokenizer.load(str(tmp_path / "copy"))
    assert again.sha256 == tok.sha256
    assert again.describe() == tok.describe()
    assert again.encode(text) == tok.encode(text)
    meta = json.loads((tmp_path / "copy" / "tokenizer.json").read_text())
    assert meta["eos_id"] == 2 and meta["padded_vocab_size"] == 512 and meta["sha256"]
    # padding of the vocabulary for the model is configurable and recorded
    assert padded_size(500, 64) == 512 and padded_size(513, 64) == 576
    assert Tokenizer.load(str(tmp_path / "copy"), pad_multiple=100).padded_vocab_size == 600


def test_training_is_seeded_and_capped(tmp_path):
    files = stdlib_files(8)
    a = train_tokenizer(files, str(tmp_path / "a"), vocab_size=420, max_sentences=20,
                        seed=5, progress=False)
    b = train_tokenizer(files, str(tmp_path / "b"), vocab_size=420, max_sentences=20,
                        seed=5, progress=False)
    assert a.sha256 == b.sha256
    assert a.meta["trained_on"]["sentences"] == 20  # the cap, sampled over all files
    u = train_tokenizer(files, str(tmp_path / "u"), vocab_size=420, model_type="unigram",
                        max_sentences=300, seed=5, progress=False)
    text = open(files[0], encoding="utf-8").read()
    assert u.decode(u.encode(text)) == text
    with pytest.raises(ValueError, match="no input files"):
        train_tokenizer([str(tmp_path / "nothing-*.txt")], str(tmp_path / "x"), progress=False)


def test_cli_train_encode_decode(tmp_path):
    out = tmp_path / "tok"
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    files = stdlib_files(6)
    r = subprocess.run([sys.executable, "-m", "data.tokenizer", "train", "--input", *files,
                        "--vocab-size", "420", "--model-type", "bpe", "--out", str(out),
                        "--max-sentences", "500"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "trained bpe vocab 420" in r.stderr and "sampling" in r.stderr
    text = "import os\nprint(os.getcwd())"
    enc = subprocess.run([sys.executable, "-m", "data.tokenizer", "encode", "--tokenizer",
                          str(out), text], env=env, capture_output=True, text=True, timeout=60)
    ids = enc.stdout.split()
    assert ids and all(x.isdigit() for x in ids)
    assert [int(x) for x in ids] == Tokenizer.load(str(out)).encode(text)
    dec = subprocess.run([sys.executable, "-m", "data.tokenizer", "decode", "--tokenizer",
                          str(out), *ids], env=env, capture_output=True, text=True, timeout=60)
    assert dec.stdout.rstrip("\n") == text
