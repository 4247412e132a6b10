"""Batches of (input, target) token windows from a prepared dataset (data/NAME/*.bin).

Each row of a batch is block_size + 1 consecutive tokens from a random offset: x is the first
block_size of them, y the same shifted by one (the next token at every position).

Conversations (a data set with a mask, data/conversations.py) are packed: a window starts where a
conversation starts, never inside one, so every reply in it comes with its question, and runs on
into the conversations that follow (no compute spent on padding; a window cut at its end only
loses the end of a reply). A target that is not the assistant's (mask 0), or that lies past the
end of the data, is IGNORE: the loss is the mean over the assistant's tokens only.

The randomness is a pure function of the step: the offsets of optimizer step s come from
np.random.default_rng([seed, split_id, s]), batch_size * grad_accum * world_size of them, and
micro-step m of rank r takes rows [(m * world_size + r) * batch_size : + batch_size]. Therefore
  - 2 ranks x batch B read exactly what 1 rank x batch 2B reads (and grad_accum=2 x B the same),
    and no two ranks ever share a row of a step;
  - resuming needs only the step counter (state_dict), not a saved random state.
"""

import json
from pathlib import Path

import numpy as np
import torch

from model.errors import UserError

SPLIT_IDS = {"train": 0, "val": 1}
IGNORE = -1  # a target that takes no part in the loss (GPT.forward skips it)
EVAL_STREAM = 0x6576616C  # "eval" in ASCII: keeps evaluation offsets apart from training steps' offsets


class BatchLoader:
    def __init__(self, data_dir, split, batch_size, block_size, seed, rank=0, world_size=1, grad_accum=1,
                 device=None):
        data_dir = Path(data_dir)
        if split not in SPLIT_IDS:
            raise UserError(f"unknown split {split!r} (train or val)")
        if not (data_dir / "meta.json").is_file():
            raise UserError(f"no prepared dataset in {data_dir} (run: python data/prepare.py {data_dir.name})")
        with open(data_dir / "meta.json", encoding="utf-8") as f:
            self.meta = json.load(f)
        if not (0 <= rank < world_size and batch_size >= 1 and block_size >= 1 and grad_accum >= 1):
            raise UserError(f"bad loader geometry: rank {rank} of {world_size}, batch_size {batch_size}, "
                            f"block_size {block_size}, grad_accum {grad_accum}")
        path = data_dir / f"{split}.bin"
        dtype = np.dtype(self.meta["dtype"])
        size = path.stat().st_size if path.is_file() else 0
        count = size // dtype.itemsize
        if count != self.meta[f"{split}_tokens"]:
            raise UserError(f"{path} holds {count:,} tokens but meta.json says {self.meta[f'{split}_tokens']:,}: "
                            f"prepare the dataset again")
        if count < block_size + 1 and not self.meta.get("mask"):  # (conversation windows may run past the end)
            raise UserError(f"the {split} split of {data_dir} has {count:,} tokens, fewer than block_size + 1 = "
                            f"{block_size + 1}: use a smaller --block_size or more data")
        # memmap: the file stays on disk and the OS pages in only the windows we read.
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        self.mask = self.starts = None
        if self.meta.get("mask"):
            self.mask = np.fromfile(data_dir / f"{split}_mask.bin", dtype=np.uint8)
            self.starts = np.fromfile(data_dir / f"{split}_starts.bin", dtype=np.int64)
            if len(self.mask) != count or not len(self.starts) or self.starts.max() >= count:
                raise UserError(f"{data_dir}: {split}_mask.bin or {split}_starts.bin does not match {path.name}: "
                                f"prepare the dataset again")
            self.unreachable = self._check_windows(block_size, data_dir, split)
        self.split, self.split_id = split, SPLIT_IDS[split]
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.device = torch.device(device) if device is not None else None
        self.step = 0  # optimizer step of the next batch
        self.micro_step = 0  # micro-step (0 .. grad_accum-1) within it

    def _check_windows(self, block_size, data_dir, split):
        """Every window must hold a trained target (else its loss is 0/0); returns how many
        trained tokens lie more than block_size after their conversation's start, where no
        window reaches them."""
        trained = np.flatnonzero(self.mask)
        window_ends = np.minimum(self.starts + block_size, len(self.mask) - 1)
        trained_before = np.concatenate([[0], np.cumsum(self.mask)])
        empty = np.flatnonzero(trained_before[window_ends + 1] - trained_before[self.starts + 1] == 0)
        if len(empty):
            raise UserError(f"{data_dir}: conversation {empty[0] + 1} of the {split} split has no reply token "
                            f"within block_size = {block_size} tokens of its start: use a larger --block_size")
        owner = np.searchsorted(self.starts, trained, side="right") - 1  # the conversation of each trained token
        return int((trained - self.starts[owner] > block_size).sum())

    def _windows(self, offsets):
        """x, y int64 tensors for windows starting at offsets, on self.device."""
        index = np.asarray(offsets)[:, None] + np.arange(self.block_size + 1)
        if self.mask is None:
            rows = torch.from_numpy(self.tokens[index].astype(np.int64))
            x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        else:
            inside = index < len(self.tokens)  # a window from the last conversations runs past the end
            index = np.minimum(index, len(self.tokens) - 1)
            rows = self.tokens[index].astype(np.int64)
            targets = np.where(inside & (self.mask[index] == 1), rows, IGNORE)
            x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(targets[:, 1:].copy())
        if self.device is not None and self.device.type == "cuda":
            # Pinned host memory lets the copy run asynchronously while the GPU still computes.
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        if self.device is not None:
            return x.to(self.device), y.to(self.device)
        return x, y

    def _offsets(self, key, count):
        if self.starts is not None:  # conversations: a random conversation's start
            return self.starts[np.random.default_rng(key).integers(0, len(self.starts), size=count)]
        # Every window needs block_size + 1 tokens, so the last valid start is len - block_size - 1.
        return np.random.default_rng(key).integers(0, len(self.tokens) - self.block_size, size=count)

    def next_batch(self):
        """(x, y), each (batch_size, block_size), for this rank's next micro-step."""
        rows_per_step = self.batch_size * self.grad_accum * self.world_size
        offsets = self._offsets([self.seed, self.split_id, self.step], rows_per_step)
        start = (self.micro_step * self.world_size + self.rank) * self.batch_size
        batch = self._windows(offsets[start:start + self.batch_size])
        self.micro_step += 1
        if self.micro_step == self.grad_accum:
            self.micro_step, self.step = 0, self.step + 1
        return batch

    def eval_batch(self, i):
        """The i-th evaluation batch: the same every time it is asked for.

        Like training, rank r takes its own slice of batch_size * world_size rows, so the ranks
        together evaluate exactly what one process with the whole batch would."""
        offsets = self._offsets([self.seed, self.split_id, EVAL_STREAM, i], self.batch_size * self.world_size)
        return self._windows(offsets[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])

    def state_dict(self):
        return {"step": self.step, "micro_step": self.micro_step}

    def load_state_dict(self, state):
        step, micro_step = int(state["step"]), int(state["micro_step"])
        if step < 0 or not 0 <= micro_step < self.grad_accum:
            raise UserError(f"loader state {state} does not fit grad_accum={self.grad_accum}")
        self.step, self.micro_step = step, micro_step
