"""The training data stream: memory-mapped packed windows, shuffled per epoch, sliced per DP rank, blended.

Global sample j (counted over all DP ranks) belongs to rank (j // micro_batch) % dp_size. A blend assigns
j to the dataset whose count lags its weight most (the greedy schedule of Megatron's blended dataset:
after any n samples every dataset holds its share within one sample). The k-th sample of dataset d is
window perm_e(k mod E_d) of its epoch e = k // E_d, where perm_e is a seeded permutation computed on the
fly (a Feistel network, no per-window index in RAM) and E_d is its window count rounded down to a multiple
of dp_size x micro_batch (the remainder is a different random subset each epoch). The whole state is
the sample counter and one counter per dataset, so resume is exact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatrain.config import DataConfig, TokenizerConfig
from megatrain.data.errors import DataError
from megatrain.data.manifest import parse_blend, read_manifest
from megatrain.data.shards import Stream, check_tokenizer_file, open_split, verify_checksums
from megatrain.data.tokenizer import load_tokenizer, special_ids, tokenizer_hash  # load_tokenizer: public API

_MASK64 = (1 << 64) - 1
MAX_PREFETCH = 8  # batches built ahead hold host memory; one or two hide the build behind a step


@dataclass(frozen=True)
class DataInfo:
    vocab_size: int  # the tokenizer's
    eod_id: int
    tokenizer_path: str
    tokenizer_sha256: str
    train_tokens: int  # over all blended datasets, after the validation carve
    valid_tokens: int


def _valid_fraction(data: DataConfig) -> float:
    f = data.valid_fraction
    if not 0.0 <= f < 1.0:
        raise DataError(f"data.valid_fraction={f} must be in [0, 1)")
    return 0.0 if data.valid_path else f


def _check_windows(name: str, stream: Stream, seq_len: int, batch: int, fix: str) -> None:
    """A split must fill one micro-batch on every DP rank: the loader reads `batch` windows per step."""
    windows = stream.windows(seq_len)
    if windows == 0:
        raise DataError(f"{name}: {stream.tokens} tokens, fewer than one window of train.seq_len + 1 = "
                        f"{seq_len + 1}; {fix}")
    if windows < batch:
        raise DataError(f"{name}: {windows} windows of train.seq_len + 1 = {seq_len + 1} tokens, fewer than "
                        f"train.micro_batch_size x DP = {batch} read per step; {fix}")


def check_data(data: DataConfig, tokenizer: TokenizerConfig, *, seq_len: int, model_vocab_size: int,
               batch: int = 1, evaluate: bool = False, hash_shards: bool = True) -> DataInfo:
    """Everything about the data that can fail, checked before any process group exists.

    `batch`: windows one step reads across DP ranks (micro_batch_size x DP); `evaluate`: the run
    evaluates, so the validation split must fill a batch too. `hash_shards`: verify every shard's
    sha256 (cached per shard). One rank of a job does it; the others check sizes only, and a
    mismatch found by that rank stops the whole job.
    """
    fraction = _valid_fraction(data)
    if not 0.0 <= data.verify_fraction <= 1.0:
        raise DataError(f"data.verify_fraction={data.verify_fraction} must be in [0, 1] (the share of unchanged "
                        "shards hashed again at each start)")
    if data.prefetch is not None and not 0 <= data.prefetch <= MAX_PREFETCH:
        raise DataError(f"data.prefetch={data.prefetch} must be in [0, {MAX_PREFETCH}] (training batches built "
                        "ahead while the step runs; 0: none), or null (2 on CUDA, 0 on CPU)")
    if evaluate and not fraction and not data.valid_path:
        raise DataError("train.eval_interval > 0 needs validation data: set data.valid_fraction > 0 or "
                        "data.valid_path, or train.eval_interval=0 to train without eval")
    dirs = [p for p, _ in parse_blend(data)] + ([data.valid_path] if data.valid_path else [])
    manifests = {d: read_manifest(d) for d in dirs}
    first = dirs[0]
    want = manifests[first]["tokenizer"]
    for d, manifest in manifests.items():
        if manifest["tokenizer"]["sha256"] != want["sha256"]:
            raise DataError(f"{d} was prepared with tokenizer {manifest['tokenizer']['sha256'][:12]}, "
                            f"{first} with {want['sha256'][:12]}: every dataset of a run needs the same "
                            "tokenizer")
        check_tokenizer_file(Path(d), manifest)
        verify_checksums(Path(d), manifest, hash_shards, data.verify_fraction)
    if tokenizer.path:
        tok = load_tokenizer(tokenizer.path)
        special_ids(tok, tokenizer, tokenizer.path)
        if tokenizer_hash(tok) != want["sha256"]:
            raise DataError(f"{first}/manifest.json was written by tokenizer {want['sha256'][:12]}, but "
                            f"tokenizer.path={tokenizer.path} is {tokenizer_hash(tok)[:12]}: "
                            "re-prepare the data with this tokenizer, or drop tokenizer.path to use the "
                            "data's own")
    if want["vocab_size"] > model_vocab_size:
        raise DataError(f"the tokenizer of {first} has {want['vocab_size']} tokens, more than "
                        f"model.vocab_size={model_vocab_size}; set model.vocab_size >= {want['vocab_size']}")
    train = valid = 0
    valid_fix = (f"raise data.valid_fraction (now {data.valid_fraction}) or give data.valid_path, lower the batch, "
                 "or set train.eval_interval=0")
    for d, _ in parse_blend(data):
        stream = open_split(d, manifests[d], "train", fraction)
        _check_windows(f"{d} (train split)", stream, seq_len, batch,
                       "prepare more data or lower train.seq_len, train.micro_batch_size or data.valid_fraction")
        train += stream.tokens
        if fraction:
            held_out = open_split(d, manifests[d], "valid", fraction)
            if evaluate:
                _check_windows(f"{d} (validation split)", held_out, seq_len, batch, valid_fix)
            valid += held_out.tokens
    if data.valid_path:
        held_out = open_split(data.valid_path, manifests[data.valid_path], "all", 0.0)
        if evaluate:
            _check_windows(f"data.valid_path={data.valid_path}", held_out, seq_len, batch,
                           "prepare more validation data or lower the batch, or set train.eval_interval=0")
        valid = held_out.tokens
    return DataInfo(vocab_size=want["vocab_size"], eod_id=want["eod_id"],
                    tokenizer_path=str(Path(first) / want["file"]), tokenizer_sha256=want["sha256"],
                    train_tokens=train, valid_tokens=valid)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(idx: np.ndarray, n: int, key: int) -> np.ndarray:
    """A seeded bijection of [0, n) applied to `idx`: 4-round Feistel on 2^k >= n, cycle-walked into range."""
    if n <= 1:
        return idx.copy()
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = [np.uint64(int(_mix(np.array([key * 4 + r], dtype=np.uint64))[0])) for r in range(4)]
    x = idx.astype(np.uint64)
    todo = np.ones(len(x), dtype=bool)
    while todo.any():
        left, right = x[todo] >> np.uint64(half), x[todo] & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        x[todo] = (left << np.uint64(half)) | right
        todo = x >= np.uint64(n)
    return x.astype(np.int64)


def _key(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = int(_mix(np.array([(h ^ (p & _MASK64)) & _MASK64], dtype=np.uint64))[0])
    return h >> 2  # room for the round counter in permute


def _merge_guess(weights: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    """The next n picks if each dataset's j-th next sample were due at (count + j + 0.5) / weight: the greedy
    schedule exactly for two datasets up to float ties, a close guess for more."""
    per = np.ceil(weights * n).astype(np.int64) + 2
    due = np.concatenate([(counts[d] + np.arange(per[d]) + 0.5) / weights[d] for d in range(len(weights))])
    owner = np.repeat(np.arange(len(weights)), per)
    return owner[np.argsort(due, kind="stable")[:n]]


def _repair(guess: np.ndarray, picks: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """A better guess: picks are exact up to the first wrong step, and a tie broken the other way shows as two
    neighbours swapped, so swap every such pair (non-overlapping) or, if the first one is no swap, move the
    right dataset's next pick forward to it."""
    first = int(wrong[0])
    swaps = wrong[(wrong + 1 < len(guess)) & (guess[np.minimum(wrong + 1, len(guess) - 1)] == picks[wrong])]
    swaps = swaps[np.r_[True, np.diff(swaps) > 1]] if len(swaps) else swaps
    if len(swaps) and swaps[0] == first:
        guess = guess.copy()
        guess[swaps], guess[swaps + 1] = guess[swaps + 1], guess[swaps]
        return guess
    later = np.flatnonzero(guess[first:] == picks[first])
    drop = first + int(later[0]) if len(later) else len(guess) - 1
    return np.concatenate([guess[:first], picks[first:first + 1], np.delete(guess[first:], drop - first)])


def blend_picks(weights: np.ndarray, samples: int, counts: list[int], n: int, window: int = 256) -> np.ndarray:
    """`_blend_window` over windows of at most `window` steps: a repair pass costs the window, not n."""
    out = np.empty(n, dtype=np.int64)
    have = np.asarray(counts, dtype=np.int64)
    for start in range(0, n, window):
        picks = _blend_window(weights, samples + start, have, min(window, n - start))
        out[start:start + len(picks)] = picks
        have = have + np.bincount(picks, minlength=len(have))
    return out


def _blend_window(weights: np.ndarray, samples: int, counts: np.ndarray, n: int) -> np.ndarray:
    """Dataset of each of the next n global samples under the greedy schedule (argmax of weight x samples -
    count after each increment, first index on ties), vectorised: from a guess, compute every step's argmax
    with the guess's own counts; a guess that agrees everywhere is the schedule (by induction on the steps),
    otherwise repair it (each repair fixes at least the first wrong step). Same float arithmetic as a loop."""
    have = np.asarray(counts, dtype=np.float64)
    target = weights * np.arange(samples + 1, samples + n + 1, dtype=np.float64)[:, None]
    guess = _merge_guess(weights, have, n)
    rows = np.arange(n)
    while True:
        onehot = np.zeros((n, len(have)))
        onehot[rows, guess] = 1.0
        picks = np.argmax(target - (have + np.cumsum(onehot, axis=0) - onehot), axis=1)
        wrong = np.flatnonzero(picks != guess)
        if not len(wrong):
            return guess
        guess = _repair(guess, picks, wrong)


class TokenLoader:
    """Micro-batches of packed windows for one DP rank; see the module docstring for the order."""

    def __init__(self, streams: list[Stream], weights: list[float], *, seq_len: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, shuffle: bool, eod_id: int, document_mask: bool,
                 names: list[str], vocab_sizes: list[int] | None = None):
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        self.streams, self.weights = streams, np.asarray(weights, dtype=np.float64)
        self.seq_len, self.mbs, self.dp_rank, self.dp_size = seq_len, micro_batch_size, dp_rank, dp_size
        self.seed, self.shuffle, self.eod_id, self.document_mask = seed, shuffle, eod_id, document_mask
        self.names, self.vocab_sizes = names, vocab_sizes
        per_call = micro_batch_size * dp_size
        self.windows = [s.windows(seq_len) for s in streams]
        self.epoch_len = [w - w % per_call for w in self.windows]
        for name, w in zip(names, self.windows):
            if w < per_call:
                raise DataError(f"{name}: {w} windows of {seq_len + 1} tokens, fewer than micro_batch_size x "
                                f"dp_size = {per_call}; prepare more data or lower the batch or seq_len")
        self.samples = 0
        self.counts = [0] * len(streams)
        self._buf = np.empty((micro_batch_size, seq_len + 1), dtype=np.int64)

    @property
    def epoch(self) -> int:
        """Epochs completed by the first (or only) dataset."""
        return self.counts[0] // self.epoch_len[0]

    def seen(self) -> tuple[int, float]:
        """(unique tokens seen, epochs) over all DP ranks, for data-constrained scaling fits.

        Unique: tokens of distinct windows, min(samples, windows) per dataset, exact within the first
        epoch (later epochs may add a few of the < dp x micro-batch windows the first left out).
        Epochs: samples / windows of the most repeated dataset.
        """
        unique = sum(min(c, w) for c, w in zip(self.counts, self.windows)) * self.seq_len
        return unique, max(c / w for c, w in zip(self.counts, self.windows))

    def _assign(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, sample index within it) of the next n global samples; advances the counters."""
        if len(self.counts) == 1:
            picks = np.zeros(n, dtype=np.int64), np.arange(self.counts[0], self.counts[0] + n)
            self.counts[0] += n
            self.samples += n
            return picks
        datasets = blend_picks(self.weights, self.samples, self.counts, n)
        counts = np.asarray(self.counts, dtype=np.int64)
        onehot = np.zeros((n, len(counts)), dtype=np.int64)
        onehot[np.arange(n), datasets] = 1
        indices = (counts + np.cumsum(onehot, axis=0) - onehot)[np.arange(n), datasets]
        self.counts = (counts + onehot.sum(axis=0)).tolist()
        self.samples += n
        return datasets, indices

    def _windows(self, d: int, k: np.ndarray) -> np.ndarray:
        """Window indices of dataset d's samples k: position in the epoch, permuted with the epoch's key."""
        epochs, pos = np.divmod(k, self.epoch_len[d])
        if self.shuffle:
            for e in np.unique(epochs):
                sel = epochs == e
                pos[sel] = permute(pos[sel], self.windows[d], _key(self.seed, d, int(e)))
        return pos

    def next_batch(self) -> dict[str, torch.Tensor]:
        datasets, indices = self._assign(self.mbs * self.dp_size)
        mine = slice(self.dp_rank * self.mbs, (self.dp_rank + 1) * self.mbs)
        datasets, indices = datasets[mine], indices[mine]
        for d in np.unique(datasets):
            rows = np.flatnonzero(datasets == d)
            for row, w in zip(rows, self._windows(int(d), indices[rows])):
                self.streams[d].read(int(w) * self.seq_len, self._buf[row])
            if self.vocab_sizes is not None:
                self._check_ids(int(d), rows)
        tokens = torch.from_numpy(self._buf)
        batch = {"input_ids": tokens[:, :-1].clone(), "labels": tokens[:, 1:].clone()}
        if self.document_mask:
            # Every document ends with EOD (and EOD never occurs inside one), so a token's document is
            # the number of EODs before it in the window; the EOD itself closes its own document.
            is_eod = (batch["input_ids"] == self.eod_id).to(torch.int32)
            batch["doc_ids"] = torch.cumsum(is_eod, dim=1, dtype=torch.int32) - is_eod
        return batch

    def _check_ids(self, d: int, rows: np.ndarray) -> None:
        """A token id outside the tokenizer's vocabulary (a damaged or foreign shard) is named here, not an
        IndexError deep in the embedding (or, on GPU, a device assert)."""
        top = int(self._buf[rows].max())
        if top >= self.vocab_sizes[d]:
            raise DataError(f"{self.names[d]}: token id {top} in the batch ending at global sample {self.samples} "
                            f"is outside the tokenizer's vocabulary (0..{self.vocab_sizes[d] - 1}): a shard is "
                            "damaged or was not written by this dataset's tokenizer; run with "
                            "data.verify_fraction=1 to find it, or re-run launcher.prepare")

    def position(self) -> tuple[int, tuple[int, ...]]:
        """The whole read position: the sample counter and each dataset's count."""
        return self.samples, tuple(self.counts)

    def seek(self, position: tuple[int, tuple[int, ...]]) -> None:
        self.samples, self.counts = position[0], list(position[1])

    def fork(self) -> TokenLoader:
        """A loader at this position with its own counters and buffer (the same streams), for a reader thread."""
        twin = copy.copy(self)
        twin.counts, twin._buf = list(self.counts), np.empty_like(self._buf)
        return twin

    def close(self) -> None:
        """Nothing to release (a Prefetcher around it stops its thread)."""

    def rewind(self) -> None:
        """Back to the first sample: the validation loader, built once, reads the same batches at every eval."""
        self.samples, self.counts = 0, [0] * len(self.counts)

    def state_dict(self) -> dict[str, int]:
        state = {"samples": self.samples, "seq_len": self.seq_len, "micro_batch_size": self.mbs,
                 "dp_size": self.dp_size}
        for d, (count, windows) in enumerate(zip(self.counts, self.windows)):
            state[f"consumed_{d}"] = count
            state[f"windows_{d}"] = windows
        return state

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        diff = {k: (state.get(k), mine.get(k)) for k in sorted(set(state) | set(mine))
                if not k.startswith(("samples", "consumed_")) and state.get(k) != mine.get(k)}
        if diff or set(state) != set(mine):
            raise DataError(f"data loader state from the checkpoint does not fit this run "
                            f"(saved, now): {diff}; exact resume needs the same datasets, seq_len, "
                            "micro_batch_size and DP size")
        self.samples = int(state["samples"])
        self.counts = [int(state[f"consumed_{d}"]) for d in range(len(self.counts))]


def build_loader(data: DataConfig, *, split: str, seq_len: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int) -> TokenLoader:
    """A loader over the train split (shuffled, infinite) or the valid split (fixed order, from the start)."""
    if split not in ("train", "valid"):
        raise DataError(f"split={split!r}; choose train or valid")
    fraction = _valid_fraction(data)
    blend = parse_blend(data)
    if split == "valid" and data.valid_path:
        blend, part = [(data.valid_path, 1.0)], "all"
    elif split == "valid" and not fraction:
        raise DataError("no validation data: set data.valid_fraction > 0 or data.valid_path")
    else:
        part = split
    manifests = [read_manifest(d) for d, _ in blend]
    streams = [open_split(d, m, part, fraction) for (d, _), m in zip(blend, manifests)]
    eod = manifests[0]["tokenizer"]["eod_id"]
    return TokenLoader(streams, [w for _, w in blend], seq_len=seq_len, micro_batch_size=micro_batch_size,
                       dp_rank=dp_rank, dp_size=dp_size, seed=seed, shuffle=split == "train", eod_id=eod,
                       document_mask=data.document_mask, names=[f"{d} ({split})" for d, _ in blend],
                       vocab_sizes=[int(m["tokenizer"]["vocab_size"]) for m in manifests])
