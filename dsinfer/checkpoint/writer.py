"""Writing a checkpoint folder safely: what `cast` and `convert` share.

Design: every output file's header is planned up front from the source headers (names, dtypes, shapes), so a
file is written as header first and then tensor by tensor, in header order, straight to disk. Memory stays at
one source tensor plus its converted form, whatever the size of a shard or of a rank file.

Everything is written into a hidden sibling folder `.{DST}.dsinfer-partial` (marked by a file inside it) and
renamed to DST only when the last byte, the index and config.json are on disk; an interrupted run therefore
never leaves a DST that looks complete. A partial folder left by a killed run is removed by the next run.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .loader import ITEMSIZE, TP_MANIFEST

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3",
               torch.float8_e8m0fnu: "F8_E8M0", torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
               torch.int8: "I8", torch.uint8: "U8"}
_ITEMSIZE = {**ITEMSIZE, "F8_E8M0": 1}           # + DeepSeek-V4's one-byte power-of-two scales
INDEX = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")
_MARKER = ".dsinfer-partial"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an output file, as its header will say."""

    name: str
    dtype: str                 # safetensors dtype string
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = _ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


class SafetensorsStream:
    """A safetensors file written header first, then one tensor at a time in header order."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path, self.specs, self._next = path, specs, 0
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for s in specs:
            header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must be the one the header names next, with its dtype and shape."""
        spec = self.specs[self._next]
        got = (name, DTYPE_NAMES.get(tensor.dtype), tuple(tensor.shape))
        assert got == (spec.name, spec.dtype, spec.shape), f"{self.path.name}: wrote {got}, planned {spec}"
        self._f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        self._f.close()
        assert self._next == len(self.specs), f"{self.path.name}: {len(self.specs) - self._next} tensors not written"


class CheckpointWriter:
    """Builds the output folder `dst` of a tool that reads the checkpoint at `src`.

        with CheckpointWriter(src, dst, force) as out:
            stream = out.open_file("model-00001-of-00002.safetensors", specs)   # then stream.write(...)
            out.finish(config)                                                    # index, config, small files, rename
    """

    def __init__(self, src: Path, dst: str | Path, force: bool = False):
        self.src, self.dst, self.force = src.resolve(), Path(dst).expanduser().resolve(), force
        self.tmp = self.dst.parent / f".{self.dst.name}.dsinfer-partial"
        self._files: dict[str, list[TensorSpec]] = {}
        self._streams: list[SafetensorsStream] = []
        self._check_destination()

    def _check_destination(self) -> None:
        dst, src = self.dst, self.src
        if dst == src or src.is_relative_to(dst):
            raise ValueError(f"--out {dst} would overwrite the source checkpoint {src}; choose another folder")
        if dst.is_relative_to(src):
            raise ValueError(f"--out {dst} is inside the source checkpoint {src}; choose a folder outside it")
        if dst.exists() and not dst.is_dir():
            raise ValueError(f"--out {dst} exists and is not a folder")
        if dst.is_dir() and any(dst.iterdir()) and not self.force:
            raise ValueError(f"--out {dst} exists and is not empty; pass --force to replace it")
        if not dst.parent.is_dir():
            raise ValueError(f"the parent folder of --out ({dst.parent}) does not exist")
        if self.tmp.exists():
            if not (self.tmp / _MARKER).is_file():
                raise ValueError(f"{self.tmp} exists but was not made by dsinfer; remove it and run again")
            print(f"dsinfer: removing {self.tmp}, left by an interrupted run", file=sys.stderr)
            shutil.rmtree(self.tmp)

    def check_space(self, nbytes: int) -> None:
        """Refuse early when the destination's file system cannot hold `nbytes` more."""
        free = shutil.disk_usage(self.dst.parent).free
        if nbytes > free:
            raise ValueError(f"the output needs {nbytes / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is free "
                             f"on the file system of {self.dst.parent}")

    def __enter__(self) -> "CheckpointWriter":
        self.tmp.mkdir()
        (self.tmp / _MARKER).write_text("an unfinished dsinfer output; safe to delete\n")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for s in self._streams:
            if not s._f.closed:
                s._f.close()
        if exc_type is not None and self.tmp.exists():
            shutil.rmtree(self.tmp)

    def open_file(self, filename: str, specs: list[TensorSpec]) -> SafetensorsStream:
        """Start one safetensors file of the output; write its tensors in the order of `specs`."""
        self._files[filename] = specs
        stream = SafetensorsStream(self.tmp / filename, specs)
        self._streams.append(stream)
        return stream

    def finish(self, config: dict, index: bool = True, extra_json: dict[str, dict] | None = None) -> None:
        """Close the files; write the index (HF `weight_map` + `metadata.total_size`), config.json and
        `extra_json`; copy the source's small non-weight files; then move the folder into place."""
        for s in self._streams:
            s.close()
        if index:
            weight_map = {s.name: f for f, specs in self._files.items() for s in specs}
            total = sum(s.nbytes for specs in self._files.values() for s in specs)
            _write_json(self.tmp / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        for name, obj in (extra_json or {}).items():
            _write_json(self.tmp / name, obj)
        self._copy_small_files()
        _write_json(self.tmp / "config.json", config)       # written last: a folder with it is complete
        old = self.dst.parent / f".{self.dst.name}.dsinfer-old"
        if self.dst.exists():
            if old.exists():
                shutil.rmtree(old)
            self.dst.rename(old)                              # empty, or non-empty with --force
        self.tmp.rename(self.dst)
        if old.exists():
            shutil.rmtree(old)
        (self.dst / _MARKER).unlink()

    def _copy_small_files(self) -> None:
        """Tokenizer files, generation_config.json, README, code...: everything but weights and what we write."""
        ours = {"config.json", INDEX, TP_MANIFEST}
        no_weights = shutil.ignore_patterns(*(f"*{s}" for s in _WEIGHT_SUFFIXES))
        for p in sorted(self.src.iterdir()):
            if p.name.startswith(".") or p.name in ours or p.name.endswith(_WEIGHT_SUFFIXES):
                continue
            if p.is_dir():
                shutil.copytree(p, self.tmp / p.name, ignore=no_weights)
            elif p.is_file():
                shutil.copy2(p, self.tmp / p.name)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")



def write_shard_by_shard(src: Path, dst: str | Path, force: bool, plans: dict, infos: dict, config: dict, desc: str,
                         progress: bool, convert) -> Path:
    """Write one output shard per input shard, tensor by tensor, then the index and `config`; returns the folder.

    plans[file]: (name, [TensorSpec, ...]) in write order (an empty list drops the tensor); infos: the source's
    TensorInfo by name. convert(name, tensor, read, stream) writes the tensor's specs to `stream`; read(name)
    loads another source tensor (a scale) from whichever shard holds it."""
    from safetensors import safe_open
    from tqdm import tqdm

    with CheckpointWriter(src, dst, force) as out:
        out.check_space(sum(s.nbytes for plan in plans.values() for _, specs in plan for s in specs))
        bar = tqdm(total=sum(i.nbytes for i in infos.values()), unit="B", unit_scale=True, desc=desc,
                   disable=not progress)
        for file, plan in plans.items():
            stream = out.open_file(file.name, [s for _, specs in plan for s in specs])
            with safe_open(file, framework="pt") as f:
                def read(name: str, f=f, file=file) -> torch.Tensor:
                    if infos[name].file == file:
                        return f.get_tensor(name)
                    with safe_open(infos[name].file, framework="pt") as other:   # a scale in another shard
                        return other.get_tensor(name)

                for name, specs in plan:
                    if specs:
                        convert(name, f.get_tensor(name), read, stream)
                        bar.update(infos[name].nbytes)
            stream.close()
        bar.close()
        out.finish(config)
    return out.dst
