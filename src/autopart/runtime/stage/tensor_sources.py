"""Read named tensors from a checkpoint on disk, only the ones asked for.

Three formats, told apart by what is on disk:

* safetensors: a ``.safetensors`` file, or a directory holding one or a sharded set with its
  ``*.safetensors.index.json`` (the Hugging Face layout).  Reads are lazy, one tensor at a time;
* a ``torch.save`` state dict (``.pt``, ``.bin``, ``pytorch_model.bin`` in a directory),
  memory-mapped so that untouched tensors are never read;
* a ``torch.distributed.checkpoint`` directory (its ``.metadata`` file), read without
  collectives, so each rank loads just its own keys.  A model saved by `autopart.save_checkpoint`
  sits under the ``model.`` prefix beside ``optim.``, which is looked through.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch

from autopart.errors import AutopartError


class CheckpointError(AutopartError):
    """A checkpoint that cannot be read, or one that is not complete."""


class TensorSource(Protocol):
    def keys(self) -> set[str]: ...

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]: ...


def open_checkpoint(path: str | Path) -> TensorSource:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if (path / ".metadata").exists():
            return _Dcp(path)
        if any(path.glob("*.distcp")):
            raise CheckpointError(
                f"checkpoint {path} has distributed-checkpoint shards but no .metadata file: "
                "its save did not finish (a rank failed or was stopped), so it is incomplete; "
                "use an earlier checkpoint"
            )
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            return _Safetensors({key: path / file for key, file in weight_map.items()})
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return _Safetensors.of_file(files[0])
        for name in ("pytorch_model.bin", "model.pt", "model.pth"):
            if (path / name).exists():
                return _TorchSave(path / name)
        raise CheckpointError(
            f"checkpoint directory {path} holds no .metadata (distributed checkpoint), "
            "*.safetensors.index.json, single .safetensors file or pytorch_model.bin"
        )
    if path.suffix == ".safetensors":
        return _Safetensors.of_file(path)
    return _TorchSave(path)


class _Safetensors:
    def __init__(self, files: dict[str, Path]) -> None:
        self._files = files

    @staticmethod
    def of_file(path: Path) -> _Safetensors:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return _Safetensors({key: path for key in handle.keys()})  # noqa: SIM118

    def keys(self) -> set[str]:
        return set(self._files)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._files[key], []).append(key)
        values = {}
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for key in names:
                    values[key] = handle.get_tensor(key)
        return values


class _TorchSave:
    def __init__(self, path: Path) -> None:
        try:
            loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"checkpoint {path} is not a readable torch.save file: {err}"
            ) from err
        if isinstance(loaded, dict) and not _all_tensors(loaded):
            nested = loaded.get("model", loaded.get("state_dict"))
            loaded = nested if isinstance(nested, dict) else loaded
        if not isinstance(loaded, dict) or not _all_tensors(loaded):
            raise CheckpointError(
                f"checkpoint {path} does not hold a state dict of tensors (nor one under "
                "'model' or 'state_dict')"
            )
        self._values: dict[str, torch.Tensor] = loaded

    def keys(self) -> set[str]:
        return set(self._values)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        return {key: self._values[key] for key in keys}


class _Dcp:
    PREFIX = "model."

    def __init__(self, path: Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self._path = path
        metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        self._meta = {
            key: value
            for key, value in metadata.items()
            if isinstance(value, TensorStorageMetadata)
        }
        # autopart's layout nests the model under "model." beside "optim."; a plain
        # dcp.save(model.state_dict()) of a Hugging Face model has "model." keys of its own.
        prefixed = any(key.startswith("optim.") for key in metadata)
        self._stored = {
            (key[len(self.PREFIX) :] if prefixed else key): key
            for key in self._meta
            if not prefixed or key.startswith(self.PREFIX)
        }

    def keys(self) -> set[str]:
        return set(self._stored)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        buffers = {}
        for key in keys:
            meta = self._meta[self._stored[key]]
            buffers[self._stored[key]] = torch.empty(meta.size, dtype=meta.properties.dtype)
        dcp.load(buffers, checkpoint_id=str(self._path), no_dist=True)
        return {key: buffers[self._stored[key]] for key in keys}


def _all_tensors(values: dict) -> bool:
    return bool(values) and all(isinstance(v, torch.Tensor) for v in values.values())
