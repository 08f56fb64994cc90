"""The streaming loader: batch contract, exactly-once resume, sources, faults.

All on real shards of stdlib sources, real DataLoader worker processes, a real
HTTP server on 127.0.0.1 and real `pipe:cat` commands.
"""

from __future__ import annotations

import collections
import copy
import functools
import hashlib
import json
import os
import random
import shutil
import socket
import time

import numpy as np
import pytest
import torch
from data_fixtures import (
    FlakyHttpServer,
    HttpServer,
    doc_hashes,
    reassemble,
    samples_of,
    shard_paths,
    shards_dir,
    stdlib_files,
    synthetic_shards,
    tokenizer_dir,
)

from data import IGNORE_INDEX, LoaderConfig, ShardError, SourceError, build_loader, merge_states
from data.loader import TokenLoader

EOS = 2


def cfg(**kw) -> dict:
    base = {"sources": shards_dir(), "seq_len": 64, "micro_batch_size": 4, "seed": 1,
            "shuffle_buffer": 16}
    base.update(kw)
    return base


def take(loader, n):
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            break
    return out


# -- the batch contract ---------------------------------------------------------------
def test_batch_contract_pack():
    loader = build_loader(cfg(return_meta=True))
    batches = take(loader, 30)
    for b in batches:
        x, y, r = b["input_ids"], b["labels"], b["reset"]
        assert x.shape == y.shape == r.shape == (4, 64)
        assert x.dtype == y.dtype == torch.long and r.dtype == torch.bool
        assert r[:, 0].all()
        # labels are the next input inside a row, except where masked
        keep = y[:, :-1] != IGNORE_INDEX
        assert torch.equal(y[:, :-1][keep], x[:, 1:][keep])
        # a masked label sits on an EOS input and the next position starts a document
        masked = y == IGNORE_INDEX
        assert (x[masked] == EOS).all()
        assert r[:, 1:][masked[:, :-1]].all()
        # reset marks exactly the document starts the meta reports (besides position 0)
        starts = torch.zeros_like(r)
        for row, segs in enumerate(b["meta"]):
            for *_k, lo, _hi, at in segs:
                if lo == 0 and at < 64:
                    starts[row, at] = True
        starts[:, 0] = True
        assert torch.equal(starts, r)
    # rows overlap by one token: the last target of a row is the next row's first input
    for b0, b1 in zip(batches, batches[1:]):
        rows = torch.cat([b0["input_ids"], b1["input_ids"][:1]])
        last = torch.cat([b0["labels"][:, -1:], b1["labels"][:1, -1:]])
        for i in range(4):
            if last[i, 0] != IGNORE_INDEX:
                assert last[i, 0] == rows[i + 1, 0]


def test_batch_contract_concat():
    batches = take(build_loader(cfg(packing="concat")), 20)
    for b in batches:
        assert not b["reset"].any()
        assert (b["labels"] != IGNORE_INDEX).all()
        assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
    flat = torch.cat([b["input_ids"] for b in batches]).flatten()
    assert (flat == EOS).sum() > 5  # documents are separated by EOS


def test_packed_documents_are_the_shard_documents():
    """One full epoch, in-process: every shard sample comes back once, token for token."""
    loader = build_loader(cfg(epochs=1, return_meta=True, seq_len=128))
    batches = list(loader)
    got, problems = doc_hashes(reassemble(batches))
    assert not problems
    want = samples_of(shards_dir())
    assert collections.Counter(got.values()) == collections.Counter(want.values())
    assert {(k[0], k[1]) for k in got} == set(want)
    last = batches[-1]
    assert (last["labels"][-1] == IGNORE_INDEX).any()  # the padded tail of the epoch


# -- exactly-once resume ---------------------------------------------------------------
def _run_chain(chain, seed, epochs=1, stops=(15, 60), **extra):
    """Run one epoch through a chain of (world_size, num_workers) shapes, interrupted at
    random global steps; returns all batches, the states, and the stages' step counts."""
    rng = random.Random(seed)
    state, batches, states = None, [], []
    for stage, (world, workers) in enumerate(chain):
        loaders = [build_loader(cfg(epochs=epochs, return_meta=True, rank=r, world_size=world,
                                    num_workers=workers, seq_len=96, **extra))
                   for r in range(world)]
        if state is not None:
            for ld in loaders:
                ld.load_state_dict(state)
        its = [iter(ld) for ld in loaders]
        last = stage == len(chain) - 1
        steps = None if last else rng.randint(*stops)
        alive = list(range(world))
        step = 0
        while alive and (steps is None or step < steps):
            for r in list(alive):
                try:
                    batches.append(next(its[r]))
                except StopIteration:
                    alive.remove(r)
            step += 1
        del its  # shuts the workers down
        state = merge_states([ld.local_state_dict() for ld in loaders])
        state = json.loads(json.dumps(state))  # what a checkpoint stores
        states.append(state)
    return batches, states


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_exactly_once_across_world_sizes_and_workers(seed):
    want = samples_of(shards_dir())
    chain = [(2, 2), (1, 2), (3, 2), (3, 0)]  # 2 ranks x 2 workers, then 2->1, 1->3, 2->0
    batches, states = _run_chain(chain, seed=seed)
    got, problems = doc_hashes(reassemble(batches))
    assert not problems, problems[:5]
    assert collections.Counter(got.values()) == collections.Counter(want.values())
    assert sorted((k[0], k[1]) for k in got) == sorted(want)
    for st in states:
        assert len(json.dumps(st)) < 4000 * (st["world_size"] * max(1, st["num_workers"]))


def test_exactly_once_in_process_many_resumes():
    """Resume after every few steps with shapes changing each time (no workers: fast)."""
    want = samples_of(shards_dir())
    chain = [(1, 0), (4, 0), (2, 0), (3, 0), (1, 0), (2, 0)]
    batches, _ = _run_chain(chain, seed=3)
    got, problems = doc_hashes(reassemble(batches))
    assert not problems, problems[:5]
    assert collections.Counter(got.values()) == collections.Counter(want.values())


def test_exactly_once_per_epoch_with_two_epochs_and_mixed_sources():
    """Resumes while readers straddle an epoch boundary, two sources mixed by weight."""
    other = shards_dir(files=12, shard_tokens=3000)
    sources = [{"url": shards_dir(), "weight": 0.6}, {"url": other, "weight": 0.4}]
    chain = [(2, 0), (3, 0), (2, 0), (3, 0)]
    batches, states = _run_chain(chain, seed=6, epochs=2, stops=(250, 450), sources=sources)

    def reading(sl):  # the epoch a reader is in: its current unit, next item, or stride
        src = sl["sources"][0]
        return (src["current"] or (src["items"] or [src])[0])["epoch"]

    assert any(len({reading(sl) for sl in st["slots"]}) > 1 for st in states[:-1])
    got, problems = doc_hashes(reassemble(batches))
    assert not problems, problems[:5]
    want = collections.Counter(samples_of(shards_dir()).values()) + collections.Counter(
        samples_of(other).values())
    for epoch in (0, 1):
        assert collections.Counter(h for k, h in got.items() if k[2] == epoch) == want


@pytest.mark.multiprocess
@pytest.mark.parametrize("stop", [8, 9, 14])
def test_same_shape_resume_is_bitwise_identical(stop):
    c = cfg(num_workers=2, world_size=2)
    straight = [take(build_loader(c, rank=r), 24) for r in range(2)]
    first = [build_loader(c, rank=r) for r in range(2)]
    part = [take(ld, stop) for ld in first]
    state = json.loads(json.dumps(merge_states([ld.local_state_dict() for ld in first])))
    again = [build_loader(c, rank=r) for r in range(2)]
    for ld in again:
        ld.load_state_dict(state)
    rest = [take(ld, 24 - stop) for ld in again]
    for r in range(2):
        resumed = part[r] + rest[r]
        for a, b in zip(straight[r], resumed, strict=True):
            for k in ("input_ids", "labels", "reset"):
                assert torch.equal(a[k], b[k])


def test_iterating_again_continues():
    ld = build_loader(cfg())
    a = take(ld, 5) + take(ld, 5)
    b = take(build_loader(cfg()), 10)
    for x, y in zip(a, b):
        assert torch.equal(x["input_ids"], y["input_ids"])


def test_epochs_visit_everything_in_new_orders():
    batches = list(build_loader(cfg(epochs=2, return_meta=True, seq_len=256)))
    got, problems = doc_hashes(reassemble(batches))
    assert not problems
    by_epoch = collections.defaultdict(list)
    for (_shard, _idx, epoch, _src), h in got.items():
        by_epoch[epoch].append(h)
    want = collections.Counter(samples_of(shards_dir()).values())
    assert set(by_epoch) == {0, 1}
    assert all(collections.Counter(v) == want for v in by_epoch.values())
    order = {}
    for b in batches:
        for row in b["meta"]:
            for _s, e, url, *_ in row:
                order.setdefault(e, [])
                if url not in order[e]:
                    order[e].append(url)
    assert order[0] != order[1]


def test_mixing_by_weight():
    other = shards_dir(files=12, shard_tokens=3000)
    sources = [{"url": shards_dir(), "weight": 0.7, "name": "a"},
               {"url": other, "weight": 0.3, "name": "b"}]
    ld = build_loader(cfg(sources=sources, return_meta=True, seq_len=32))
    docs = collections.Counter()
    for b in take(ld, 400):
        for row in b["meta"]:
            for src, _e, _u, _i, lo, _hi, _at in row:
                if lo == 0:
                    docs[src] += 1
    frac = docs[0] / (docs[0] + docs[1])
    assert 0.62 < frac < 0.78, docs
    st = ld.state_dict()
    assert st["sources"] == ["a", "b"]


def test_config_checks():
    with pytest.raises(ValueError, match="unknown loader config keys"):
        LoaderConfig.from_dict({**cfg(), "seqlen": 5})
    with pytest.raises(ValueError, match="shards but the loader runs"):
        build_loader(cfg(world_size=40, rank=0, num_workers=2))
    with pytest.raises(ValueError, match="packing"):
        build_loader(cfg(packing="nope"))
    a = build_loader(cfg())
    b = build_loader(cfg(seed=2))
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict(a.state_dict())
    other = dict(a.state_dict(), content="0" * 24)
    with pytest.raises(ValueError, match="other contents"):
        build_loader(cfg()).load_state_dict(other)
    # the same shards under another address: a state moves from disk to http or pipe
    n = len(shard_paths(shards_dir()))
    c = build_loader(cfg(sources=f"pipe:cat {shards_dir()}/shard-{{000000..{n - 1:06d}}}.tar"))
    c.load_state_dict(a.state_dict())


@pytest.mark.multiprocess
@pytest.mark.slow
def test_state_dict_all_gathers_over_gloo(tmp_path):
    import torch.multiprocessing as mp

    port = _free_port()
    mp.start_processes(_gloo_worker, args=(2, port, str(tmp_path), shards_dir()), nprocs=2,
                       join=True, start_method="spawn")
    s0 = json.loads((tmp_path / "state0.json").read_text())
    s1 = json.loads((tmp_path / "state1.json").read_text())
    assert s0 == s1 and s0["world_size"] == 2 and len(s0["slots"]) == 2
    # the gathered state resumes a single-rank loader that reads the rest exactly once
    ld = build_loader(cfg(epochs=1, return_meta=True))
    ld.load_state_dict(s0)
    seen = [torch.load(tmp_path / f"batches{r}.pt", weights_only=False) for r in range(2)]
    got, problems = doc_hashes(reassemble(seen[0] + seen[1] + list(ld)))
    assert not problems
    want = samples_of(shards_dir())
    assert collections.Counter(got.values()) == collections.Counter(want.values())


def _gloo_worker(rank, world, port, out, folder):
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    ld = build_loader(cfg(sources=folder, epochs=1, return_meta=True, rank=rank,
                          world_size=world))
    batches = take(ld, 7 + rank)
    state = ld.state_dict()
    with open(os.path.join(out, f"state{rank}.json"), "w") as f:
        json.dump(state, f)
    torch.save(batches, os.path.join(out, f"batches{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- sources -----------------------------------------------------------------------------
def _epoch_ids(source, **kw):
    ld = build_loader(cfg(sources=source, epochs=1, seq_len=128, **kw))
    return torch.cat([b["input_ids"] for b in ld])


@pytest.mark.integration
def test_http_and_pipe_sources_match_local_folder():
    folder = shards_dir()
    n = len(shard_paths(folder))
    local = _epoch_ids(folder)
    braces = f"shard-{{000000..{n - 1:06d}}}.tar"
    assert torch.equal(local, _epoch_ids(os.path.join(folder, braces)))
    with HttpServer(folder) as srv:
        assert torch.equal(local, _epoch_ids(f"{srv.url}/{braces}"))
        # the manifest names the shards and their digests (checked while streaming)
        assert torch.equal(_epoch_ids(folder, num_workers=2),
                           _epoch_ids(f"{srv.url}/manifest.json", num_workers=2))
    assert torch.equal(local, _epoch_ids(f"pipe:cat {folder}/{braces}"))


@pytest.mark.integration
def test_http_connection_dropped_mid_shard_resumes_with_range():
    folder = shards_dir()
    local = _epoch_ids(folder)
    with FlakyHttpServer(folder, drops=1) as srv:
        ld = build_loader(cfg(sources=f"{srv.url}/manifest.json", epochs=1, seq_len=128,
                              retry_backoff=0.01))
        got = torch.cat([b["input_ids"] for b in ld])
        cuts = srv.httpd.cuts
    assert torch.equal(local, got)
    n = len(shard_paths(folder))
    assert cuts == n + 1  # every shard once, and the manifest
    assert ld.stats["retries"] == n
    # cut with no progress more often than the retries allow: a named error
    with FlakyHttpServer(folder, drops=5, keep=0.0) as srv:
        ld = build_loader(cfg(sources=f"{srv.url}/shard-{{000000..000003}}.tar", epochs=1,
                              retries=2, retry_backoff=0.01))
        with pytest.raises(ShardError, match=r"shard-00000\d\.tar at byte offset \d+: read failed"):
            list(ld)


def test_webdataset_library_reads_the_shards():
    import webdataset as wds

    path = shard_paths(shards_dir())[0]
    n = 0
    for sample in wds.WebDataset(path, shardshuffle=False):
        ids = np.frombuffer(sample["tokens.u16"], "<u2")
        assert ids.size > 0 and int(ids.max()) < 512
        assert sample["source.txt"].decode().startswith(os.path.dirname(stdlib_files(1)[0]))
        n += 1
    assert n == json.load(open(os.path.join(shards_dir(), "manifest.json")))["shards"][0][
        "samples"]


def test_validation_split_source(tmp_path):
    from data import prepare_shards

    out = str(tmp_path / "s")
    prepare_shards(stdlib_files(6), tokenizer_dir(), out, text_mode="paragraph", shard_tokens=4000,
            val_fraction=0.2, progress=False)
    val = build_loader({"sources": out + "#val", "seq_len": 32, "micro_batch_size": 2,
                        "epochs": 1, "return_meta": True})
    urls = {seg[2] for b in val for row in b["meta"] for seg in row}
    assert urls and all("/val/" in u for u in urls)
    # the val folder itself works too, with the digests of the manifest above it
    from data import expand_source

    sh = expand_source(os.path.join(out, "val"))
    assert sh.urls and set(sh.sha256) == set(sh.urls)
    assert expand_source(out + "#val").urls == sh.urls


# -- faults ------------------------------------------------------------------------------
def _corrupt_copy(tmp_path, how: str) -> tuple[str, str]:
    src = shards_dir()
    dst = str(tmp_path / how)
    shutil.copytree(src, dst)
    victim = shard_paths(dst)[5]
    data = bytearray(open(victim, "rb").read())
    if how == "header":
        data[1024 + 130] ^= 0x5A  # inside the size field of the second member's header
    elif how == "truncate":
        data = data[: len(data) // 2 + 7]
    elif how == "data":
        data[512] ^= 0x01  # low byte of the first token id: still a valid id
    open(victim, "wb").write(bytes(data))
    return dst, victim


@pytest.mark.parametrize("how,match", [("header", "corrupt tar header"),
                                       ("truncate", "truncated"),
                                       ("data", "sha256 mismatch")])
def test_corrupt_shard_is_named(tmp_path, how, match):
    folder, victim = _corrupt_copy(tmp_path, how)
    with pytest.raises(ShardError, match=match) as ei:
        list(build_loader(cfg(sources=folder, epochs=1, seq_len=256)))
    assert ei.value.shard.endswith(os.path.basename(victim))
    assert os.path.basename(victim) in str(ei.value)
    if how != "data":
        assert ei.value.offset is not None and f"byte offset {ei.value.offset}" in str(ei.value)
        assert 0 < ei.value.offset <= os.path.getsize(victim)


@pytest.mark.parametrize("how", ["header", "truncate"])
def test_corrupt_shard_skipped_and_counted(tmp_path, how):
    folder, victim = _corrupt_copy(tmp_path, how)
    ld = build_loader(cfg(sources=folder, epochs=1, seq_len=256, on_error="skip",
                          return_meta=True))
    with pytest.warns(RuntimeWarning, match="skipping shard"):
        batches = list(ld)
    assert ld.stats["skipped_shards"] == 1
    assert os.path.basename(victim) in ld.stats["last_error"]
    assert ld.stats["skipped"] == [victim]
    got, _ = doc_hashes(reassemble(batches))
    want = samples_of(shards_dir())
    others = {k: v for k, v in want.items() if k[0] != os.path.basename(victim)}
    got_other = {(k[0], k[1]): v for k, v in got.items() if k[0] != os.path.basename(victim)}
    assert got_other == others
    assert ld.state_dict()["slots"][0]["stats"]["skipped_shards"] == 1


def test_unreachable_url_is_retried_then_named():
    port = _free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}/shard-{{0..3}}.tar"
    ld = build_loader(cfg(sources=url, retries=2, retry_backoff=0.05, epochs=1))
    t0 = time.time()
    with pytest.raises(SourceError, match=f"127.0.0.1:{port}/shard-") as ei:
        next(iter(ld))
    assert time.time() - t0 >= 0.05 + 0.1  # two backoffs: 0.05 s, then 0.1 s
    assert "after 3 attempts" in str(ei.value)
    ld = build_loader(cfg(sources=url, retries=1, retry_backoff=0.01, epochs=1,
                          on_error="skip"))
    with pytest.warns(RuntimeWarning):
        assert list(ld) == []
    assert ld.stats["skipped_shards"] == 4 and ld.stats["retries"] == 4


def test_failing_pipe_command_is_an_error(tmp_path):
    ld = build_loader(cfg(sources=f"pipe:cat {tmp_path}/missing-{{0..3}}.tar", epochs=1))
    with pytest.raises(ShardError, match="exited with status"):
        next(iter(ld))


def test_loader_state_is_small_and_json(tmp_path):
    ld = TokenLoader(cfg())
    take(ld, 3)
    st = ld.state_dict()
    text = json.dumps(st)
    assert len(text) < 4000
    assert json.loads(text) == st


def test_endless_stream_over_unreadable_shards_fails_instead_of_hanging():
    port = _free_port()
    ld = build_loader(cfg(sources=f"http://127.0.0.1:{port}/s-{{0..1}}.tar", retries=0,
                          on_error="skip"))
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="gave no sample"):
        next(iter(ld))


def test_reset_mask_makes_packed_rows_equal_documents_run_alone():
    """The batch's `reset` fed to xlstm_kernels.mlstm_chunkwise gives, on every document piece
    of a row, exactly the output of that piece run alone (the state restarts)."""
    import xlstm_kernels

    batches = take(build_loader(cfg(seq_len=80, micro_batch_size=3)), 20)
    b = max(batches, key=lambda x: int(x["reset"].sum()))  # the most documents
    reset = b["reset"]
    bsz, s = reset.shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(bsz, 2, s, 8, generator=g, dtype=torch.float64) for _ in range(3))
    i, f = (torch.randn(bsz, 2, s, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    h = xlstm_kernels.mlstm_chunkwise(q, k, v, i, f, chunk_size=16, reset=reset)
    pieces = 0
    for r in range(bsz):
        cuts = torch.nonzero(reset[r]).flatten().tolist() + [s]
        assert cuts[0] == 0
        for lo, hi in zip(cuts, cuts[1:]):
            alone = xlstm_kernels.mlstm_chunkwise(q[r:r + 1, :, lo:hi], k[r:r + 1, :, lo:hi],
                                            v[r:r + 1, :, lo:hi], i[r:r + 1, :, lo:hi],
                                            f[r:r + 1, :, lo:hi], chunk_size=16)
            torch.testing.assert_close(h[r:r + 1, :, lo:hi], alone, rtol=1e-9, atol=1e-10)
            pieces += 1
    assert pieces >= bsz + 2


def test_finite_mixed_sources_resume_bitwise_after_one_runs_out():
    other = shards_dir(files=12, shard_tokens=3000)
    c = cfg(sources=[{"url": shards_dir(), "weight": 0.2}, {"url": other, "weight": 0.8}],
            epochs=1, seq_len=128)
    straight = list(build_loader(c))
    n = len(straight)
    first = build_loader(c)
    part = take(first, n - 40)  # the smaller, heavier source has run out by then
    assert first.state_dict()["slots"][0]["sources"][1]["exhausted"]
    again = build_loader(c)
    again.load_state_dict(json.loads(json.dumps(first.state_dict())))
    resumed = part + list(again)
    assert len(resumed) == n
    for a, b in zip(straight, resumed):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_leftover_ranges_partition_an_item():
    """Window bookkeeping: what a partly-read item still owes, for random items."""
    from data.state import _coords_to_ranges, _merge_ranges, _tail_ranges

    rng = random.Random(0)
    for _ in range(300):
        length = rng.randint(1, 60)
        cuts = sorted(rng.sample(range(length + 1), min(length + 1, rng.choice([2, 4, 6]))))
        ranges = [[a, b] for a, b in zip(cuts[::2], cuts[1::2]) if a < b] or [[0, length]]
        if rng.random() < 0.5:
            ranges[-1][1] = -1  # open-ended: to the end of the unit
        included = [i for lo, hi in ranges for i in range(lo, length if hi < 0 else hi)]
        w = rng.randint(0, len(included))
        n = rng.randint(0, len(included) - w)
        left_coords = sorted(rng.sample(range(w, w + n), rng.randint(0, n)))
        r = _merge_ranges(_coords_to_ranges(ranges, left_coords) + _tail_ranges(ranges, w + n))
        owed = [i for lo, hi in r for i in range(lo, length if hi < 0 else hi)]
        want = [included[c] for c in left_coords] + included[w + n:]
        assert owed == sorted(owed) and owed == sorted(want), (ranges, w, n, left_coords, r)


# -- checkpoints written before the typed state ---------------------------------------
def _batches_sha256(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        for k in ("input_ids", "labels", "reset"):
            h.update(b[k].numpy().tobytes())
    return h.hexdigest()


@pytest.mark.multiprocess
@pytest.mark.parametrize("version", [1, 2])
def test_states_saved_by_older_loaders_still_load(tmp_path, version):
    """tests/data_state_v1.json: states saved by the loader of commit 69c3dab (untyped
    one-letter dicts, version 1); data_state_v2.json: by the loader of 717cb88 (typed,
    version 2, the per-window seeded shuffle). Both over `synthetic_shards`, with what
    that loader produced after loading them: the next batches at the same shape (bitwise)
    and the whole rest of the epoch at another shape (bitwise, and which documents).
    The resumed loader keeps the old window order, so it writes version 2."""
    fixture = json.load(open(os.path.join(os.path.dirname(__file__),
                                          f"data_state_v{version}.json")))
    folder = synthetic_shards(str(tmp_path / "s"))
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    assert [e["sha256"] for e in manifest["shards"]] == fixture["shard_sha256"]
    base = {**fixture["config"], "sources": folder}
    for case in fixture["cases"]:
        state = case["state"]
        assert state["version"] == version and "slots" in state
        ws, nw = case["world_size"], case["num_workers"]
        again = [build_loader(base, rank=r, world_size=ws, num_workers=nw) for r in range(ws)]
        for ld in again:
            ld.load_state_dict(copy.deepcopy(state))
        assert [_batches_sha256(take(ld, 6)) for ld in again] == case["next_batches_sha256"]
        assert merge_states([ld.local_state_dict() for ld in again])["version"] == 2
        ows = case["other_world_size"]
        rest = []
        for r in range(ows):
            ld = build_loader(base, rank=r, world_size=ows, num_workers=0)
            ld.load_state_dict(copy.deepcopy(state))
            rest += list(ld)
        want = case["rest_at_other_shape"]
        assert sorted(f"{k[0]}:{k[1]}" for k in reassemble(rest)) == want["documents"]
        assert len(rest) == want["batches"] and _batches_sha256(rest) == want["sha256"]


def test_state_is_typed_and_another_version_is_a_clear_error():
    from data import LoaderState

    ld = build_loader(cfg())
    take(ld, 3)
    st = ld.state_dict()
    assert st["kind"] == "xlstm-data-state" and st["version"] == 3
    typed = LoaderState.from_dict(st)
    assert typed.to_dict() == st and typed.slots[0].stats.batches == 3
    assert typed.slots[0].sources[0].current.window_size > 0  # a named, open window
    again = build_loader(cfg())
    again.load_state_dict(typed)  # the dataclass itself loads too
    want = take(ld, 2)
    for a, b in zip(take(again, 2), want, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
    for bad in (4, 0, None, "3", True):
        with pytest.raises(ValueError, match=f"data loader state version {bad!r}: this "
                                             "loader reads versions 1, 2, 3"):
            build_loader(cfg()).load_state_dict({**st, "version": bad})
    with pytest.raises(ValueError, match="not a data loader state"):
        build_loader(cfg()).load_state_dict(ld.local_state_dict())


def test_window_orders_of_each_version():
    """Version 3's order is a permutation fixed by the window's place (seed, source,
    epoch, position, window start), another for each; versions 1-2 keep theirs."""
    from data.state import Unit, window_order

    def order(version, seed=5, **kw):
        u = Unit(**{"epoch": 1, "position": 3, **kw}, window_size=40)
        return window_order(seed, 0, u, 64, version)

    v3 = order(3)
    assert sorted(v3) == list(range(40)) and v3 == order(3) and v3 != list(range(40))
    others = [order(3, seed=6), order(3, epoch=2), order(3, position=4),
              order(3, window_start=40), order(2)]
    assert all(o != v3 and sorted(o) == list(range(40)) for o in others)
    assert order(2) == order(1) == np.random.default_rng([5, 7, 0, 1, 3, 0]).permutation(
        40).tolist()


def test_spec_lists_follow_webdataset_conventions():
    """Brace ranges keep the zero padding written, `::` joins lists, a pipe: command keeps
    its shell variables (no `${WDS_...}` substitution)."""
    from data import expand_source

    folder = shards_dir()
    names = [os.path.basename(p) for p in shard_paths(folder)]
    spec = f"{folder}/shard-{{000000..000001}}.tar::{folder}/{names[3]}"
    assert [os.path.basename(u) for u in expand_source(spec).urls] == names[:2] + [names[3]]
    sh = expand_source(f"{folder}/shard-{{000000..000002}}.tar")
    assert set(sh.sha256) == set(sh.urls)  # digests from the manifest beside them
    pipe = expand_source("pipe:cat ${HOME}/s-{0..1}.tar").urls
    assert pipe == ["pipe:cat ${HOME}/s-0.tar", "pipe:cat ${HOME}/s-1.tar"]


def test_batch_is_the_narrow_stream_and_expands_exactly():
    """A batch holds the shards' uint16 ids once, (B*S+1,); rows() are its (B, S+1) views;
    `to` widens ids above 32767 exactly and builds labels and reset from the starts."""
    from data import Batch

    b = next(iter(build_loader(cfg(seq_len=64, micro_batch_size=3))))
    assert b.ids.dtype == torch.uint16 and b.ids.shape == (3 * 64 + 1,)
    rows = b.rows()
    assert rows.shape == (3, 65) and rows.data_ptr() == b.ids.data_ptr()
    x, r, y = b.to("cpu")
    assert torch.equal(x, rows[:, :-1].long()) and torch.equal(x, b["input_ids"])
    ids = torch.tensor([1, 65535, 40000, 2, 32768], dtype=torch.uint16)
    x, r, y = Batch(ids, torch.tensor([0, 3]), 5, (2, 2), True).to("cpu")
    assert x.tolist() == [[1, 65535], [40000, 2]]
    assert y.tolist() == [[65535, 40000], [IGNORE_INDEX, 32768]]
    assert r.tolist() == [[True, False], [True, True]]


# -- the window packer against the per-document reference ----------------------------
def _ref_docs(reader):
    """The per-document reader the window packer replaced: (key, tokens, token offset) per
    document, advancing the unit's window state one document at a time."""
    from data.loader import ShardError, SourceError, window_order

    st, c = reader.st, reader.cfg
    k = max(1, int(c.shuffle_buffer))
    while True:
        cur = st.current
        if cur is None:
            cur = st.current = reader._next_unit()
            if cur is None:
                st.exhausted = True
                return
        try:
            for idxs, views in reader._windows(cur, k):
                window = list(zip(idxs, views))
                size = cur.window_size = len(window)
                order = window_order(c.seed, reader.s, cur, k, reader.slot.version)
                first, t = cur.ranges[0][0], cur.token_offset
                docs = [((reader.s, cur.epoch, cur.position, i), tokens, t if i == first else 0)
                        for i, tokens in map(window.__getitem__, order)]
                for m in range(cur.emitted, size):
                    cur.emitted = m + 1
                    yield docs[m]
                cur.window_start += size
                cur.emitted = cur.window_size = 0
        except (ShardError, SourceError, OSError) as e:
            if c.on_error != "skip":
                raise
            reader.slot.skipped(e)
        st.current = None


def _ref_batches(slot, alloc):
    """The per-document packer the window packer replaced: (ids, starts, end, meta) per
    batch, the slot's live state advanced after each."""
    from data import loader as L
    from data.loader import DocRef, Unit
    from data.state import rng

    c, st = slot.cfg, slot.st
    need = c.micro_batch_size * c.seq_len + 1
    nexts = [functools.partial(next, _ref_docs(r), None) for r in slot.readers]

    def choose():  # one counter-based draw by weight among the sources not ended
        alive = [r for r in slot.readers if not r.st.exhausted]
        if len(alive) <= 1:
            return alive[0] if alive else None
        k, block = st.mix_draws, L._MIX_BLOCK
        u = rng(c.seed, 5, st.generation, st.index, k // block).random(block)[k % block]
        st.mix_draws = k + 1
        w = np.cumsum([slot.weights[r.s] for r in alive])
        return alive[int(np.searchsorted(w, u * w[-1], side="right"))]

    def draw():
        if len(nexts) == 1:
            return nexts[0]()
        while (r := choose()) is not None:
            if (d := nexts[r.s]()) is not None:
                return d
        return None

    pending = None
    if st.carry is not None:
        d = st.carry
        key = (d.source, d.epoch, d.position, d.sample)
        unit = Unit(d.epoch, d.position, [[d.sample, d.sample + 1]])
        pending = (key, next(slot.readers[d.source]._windows(unit, 1, verify=False))[1][0],
                   d.token_offset)
    while not st.done:
        flat = alloc()
        starts, segs, pos = [], [], 0
        from_carry = pending is not None
        while pos < need:
            if pending is None and (pending := draw()) is None:
                break
            key, tokens, off = pending
            if not off:
                starts.append(pos)
            end = pos + len(tokens) - off
            if end < need:
                flat[pos:end] = tokens[off:]
                flat[end] = c.eos_id
                hi = len(tokens) + 1
            else:
                hi = off + need - pos
                flat[pos:need] = tokens[off:hi]
            segs.append((pos, key, off, hi - off))
            pos += hi - off
            pending = (key, tokens, hi - 1) if pos == need else None
        if pos < need:
            st.done, st.carry = True, None
            if pos == 0 or (pos == 1 and from_carry):
                break
            flat[pos:] = c.pad_id
        else:
            st.carry = DocRef(*pending[0], pending[2])
        st.stats.batches += 1
        st.stats.tokens += need - 1
        meta = [[] for _ in range(c.micro_batch_size)]
        for p, (src, e, u, i), off, n in segs:
            for r, row in enumerate(meta):
                a, z = max(p, r * c.seq_len), min(p + n, r * c.seq_len + c.seq_len + 1)
                if a < z:
                    row.append((src, e, slot.readers[src].url(e, u), i, off + a - p,
                                off + z - p, a - r * c.seq_len))
        yield flat, starts, pos, meta


def _edge_shards(folder: str, shards: int = 4, docs: int = 30, seed: int = 0) -> str:
    """Shards whose documents include empty and one-token ones and some longer than the
    batches below (0..300 ids), no manifest."""
    import io
    import tarfile

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(shards):
        with tarfile.open(os.path.join(folder, f"shard-{i:06d}.tar"), "w",
                          format=tarfile.USTAR_FORMAT) as tf:
            for d in range(docs):
                n = int(rng.choice([0, 1, 2, int(rng.integers(3, 300))]))
                data = rng.integers(4, 1000, size=n, dtype="<u2").tobytes()
                info = tarfile.TarInfo(f"{i:03d}{d:04d}.tokens.u16")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return folder


def _same_as_reference(config: dict, state: dict | None = None, checks: int = 3) -> int:
    """Every slot of a loader (resumed from `state`) packed by the window packer and by
    the per-document reference: the same batches (ids, starts, end, meta) and the same
    slot state after each one; and a copy of the state taken after some batches resumes
    to the same next batches. Returns the number of batches compared."""
    import dataclasses
    import itertools
    import pickle

    from data import loader as L

    ld = build_loader({**config, "return_meta": True})
    if state is not None:
        ld.load_state_dict(copy.deepcopy(state))
    c = ld.cfg
    dtype = L._compact_dtype(c, ld.shards)
    need = c.micro_batch_size * c.seq_len + 1

    def alloc():
        return np.full(need, 12345, dtype)  # stale contents must be overwritten

    def slot(st):
        return L._Slot(c, ld.shards, ld.weights, L._state_of(st), ld.version)

    n = 0
    for st0 in ld._slots:
        new, ref = slot(st0), slot(st0)
        rng = random.Random(n)
        for i, (a, b) in enumerate(itertools.zip_longest(
                new.batches(alloc, snapshot=False, make=lambda *p: p),
                _ref_batches(ref, alloc))):
            assert a is not None and b is not None, f"batch {i}: one stream ended first"
            assert np.array_equal(a[0], b[0]), f"batch {i}: ids differ"
            assert list(a[1]) == b[1] and a[2] == b[2] and a[3] == b[3], f"batch {i}"
            assert dataclasses.asdict(new.st) == dataclasses.asdict(ref.st), f"batch {i}"
            if checks and rng.random() < 0.2:  # resume from the state after this batch
                checks -= 1
                again = slot(pickle.dumps(new.st))
                rest = again.batches(alloc, snapshot=False, make=lambda *p: p)
                for k, x in zip(range(3), rest):
                    ref_next = _ref_batches(slot(pickle.dumps(ref.st)), alloc)
                    y = next(itertools.islice(ref_next, k, None))
                    assert np.array_equal(x[0], y[0]) and list(x[1]) == y[1]
            n += 1
    return n


@pytest.mark.parametrize("copied", [True, False])
@pytest.mark.parametrize("seq_len,batch,shuffle", [(16, 2, 1), (16, 2, 7), (64, 4, 16),
                                                   (8, 1, 1000), (300, 3, 5)])
def test_window_packer_matches_the_per_document_reference(tmp_path, monkeypatch, seq_len,
                                                          batch, shuffle, copied):
    """Documents shorter and longer than a batch (empty ones too), shuffle windows of 1
    and more (over whole units), two epochs, then resumed mid-window at another world
    size (token-offset carries, partial units) and a mixed second source. Each run packed
    from its copy (`copied`, as short documents are) or from the documents' views."""
    monkeypatch.setattr("data.loader._SHORT", 1 << 40 if copied else 0)
    folder = _edge_shards(str(tmp_path / "e"))
    base = {"sources": folder, "seq_len": seq_len, "micro_batch_size": batch, "seed": 3,
            "shuffle_buffer": shuffle, "epochs": 2}
    assert _same_as_reference(base) > 5
    for stop in (1, 3, 8):
        ld = build_loader(base, world_size=2, rank=1)
        take(ld, stop)
        state = merge_states([build_loader(base, world_size=2).local_state_dict(),
                              ld.local_state_dict()])
        for world in (1, 2, 3):
            for r in range(world):
                _same_as_reference({**base, "world_size": world, "rank": r}, state)
    mixed = {**base, "sources": [{"url": folder, "weight": 0.7},
                                 {"url": synthetic_shards(str(tmp_path / "s")), "weight": 0.3}]}
    assert _same_as_reference(mixed) > 5
    with pytest.MonkeyPatch.context() as mp:  # blocks of mixing draws end inside batches
        mp.setattr("data.loader._MIX_BLOCK", 3)
        _same_as_reference(mixed)
    ld = build_loader(mixed)
    take(ld, 4)
    _same_as_reference(mixed, ld.state_dict())
    _same_as_reference({**mixed, "world_size": 2, "rank": 1}, ld.state_dict())
