"""engine.data.sampler: text windows and SFT rows are drawn by one function, which equals the arithmetic both used."""
import numpy as np
import pytest

from engine.data import sampler
from engine.data.sampler import EpochPermutations, eval_ranges, sample_indices
from engine.data.sft import PackedExamples
from engine.data.text import TokenWindows

N, T = 13, 4  # rows (windows / packed rows) and seq_len


def old_indices(seed, n, step, micro, batch_size, accum, rank, world_size):
    """The index arithmetic TokenWindows.batch and PackedExamples.batch each carried before the sampler."""
    start = (step * accum * world_size + micro * world_size + rank) * batch_size
    epochs, pos = np.divmod(np.arange(start, start + batch_size), n)
    return [int(np.random.default_rng([seed, int(e)]).permutation(n)[p]) for e, p in zip(epochs, pos)]


def old_eval_ranges(n, batch_size, max_batches, rank, world_size):
    starts = range(0, n, batch_size)
    return [range(s, min(s + batch_size, n)) for i, s in enumerate(starts[:max_batches]) if i % world_size == rank]


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """A TokenWindows and a PackedExamples of N rows each, both recording the row indices they gather."""
    path = tmp_path / "train.bin"
    np.arange(N * T + 1, dtype=np.uint16).tofile(path)
    windows = TokenWindows(path, T, np.uint16, seed=0)
    examples = [(np.arange(3, dtype=np.int64), np.ones(3, bool)) for _ in range(N)]
    packed = PackedExamples(examples, [[i] for i in range(N)], T, pad_id=0)
    assert len(windows) == len(packed) == N
    gathered = []
    for obj in (windows, packed):
        inner = obj._gather
        monkeypatch.setattr(obj, "_gather", lambda rows, inner=inner: gathered.append(list(rows)) or inner(rows))
    return windows, packed, gathered


def test_text_and_sft_batches_come_from_the_one_sampler(sources, monkeypatch):
    windows, packed, gathered = sources
    assert TokenWindows.batch is PackedExamples.batch is sampler.Sampled.batch
    assert TokenWindows.eval_batches is PackedExamples.eval_batches is sampler.Sampled.eval_batches
    calls = []
    real = sampler.sample_indices
    monkeypatch.setattr(sampler, "sample_indices", lambda *a, **k: calls.append(k) or real(*a, **k))
    windows.batch(3, 1, batch_size=2, accum=2)
    packed.batch(3, 1, batch_size=2, accum=2)
    assert len(calls) == 2 and gathered[0] == gathered[1]


@pytest.mark.parametrize("seed", [0, 1, 1234])
def test_sampler_indices_equal_the_old_arithmetic(sources, seed):
    windows, packed, gathered = sources
    windows.seed = packed.seed = seed
    for step, micro, bs, accum, rank, world in [(0, 0, 4, 1, 0, 1), (2, 1, 3, 2, 1, 2), (7, 0, 5, 1, 0, 1),
                                                (9, 2, 2, 3, 0, 2), (40, 0, 13, 1, 0, 1), (5, 0, 27, 1, 1, 2)]:
        want = old_indices(seed, N, step, micro, bs, accum, rank, world)
        assert sample_indices(EpochPermutations(N, seed), step, micro, batch_size=bs, accum=accum, rank=rank,
                              world_size=world) == want
        for obj in (windows, packed):
            gathered.clear()
            obj.batch(step, micro, batch_size=bs, accum=accum, rank=rank, world_size=world)
            assert gathered == [want]


def test_eval_order_equals_the_old_one_and_covers_every_row_once():
    for n, bs, max_batches, world in [(13, 4, None, 1), (13, 4, 2, 1), (13, 3, None, 2), (5, 8, None, 3)]:
        for rank in range(world):
            assert list(eval_ranges(n, bs, max_batches, rank, world)) == old_eval_ranges(n, bs, max_batches, rank,
                                                                                        world)
        if max_batches is None:
            rows = sorted(i for r in range(world) for rng in eval_ranges(n, bs, None, r, world) for i in rng)
            assert rows == list(range(n))


def test_sft_rows_reuse_the_epoch_permutation_instead_of_rebuilding_it(sources, monkeypatch):
    _, packed, _ = sources
    built = []
    real = np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda *a: built.append(a) or real(*a))
    for step in range(3):  # 3 steps of 4 rows stay within epoch 0 of 13 rows
        packed.batch(step, batch_size=4)
    assert len(built) == 1


def test_bad_batch_arguments_are_named():
    with pytest.raises(ValueError, match=r"0 <= micro < accum.*got step=0, micro=2, accum=2"):
        sample_indices(EpochPermutations(N, 0), 0, 2, batch_size=1, accum=2)
