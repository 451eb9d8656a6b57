"""What a checkpoint carries from the release its weights came from, so an export loses nothing.

`hf-to-mcore` stores the source directory's small files verbatim under `hf/` (config.json,
generation_config.json, the tokenizer, remote-code modules named by `auto_map`) and the record of
the conversion in `conversion.json` (source, dtype, what was dropped). Training reads both from the
checkpoint it starts from and writes them into every checkpoint it saves, so `mcore-to-hf` of any
later step writes the source config back, changing only what training changed.
"""
from __future__ import annotations

import json
import os
from typing import Optional

HF_SOURCE = "hf"
CONVERSION = "conversion.json"
# weights and their indexes are what the converter rewrites; everything else small is kept
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
MAX_FILE_BYTES = 64 << 20


def source_files(hf_dir: str) -> tuple[dict[str, bytes], list[str]]:
    """({name: bytes} of the source directory's top-level files to keep, names left out because
    they are larger than MAX_FILE_BYTES)."""
    kept, skipped = {}, []
    for name in sorted(os.listdir(hf_dir)):
        path = os.path.join(hf_dir, name)
        if name.startswith(".") or not os.path.isfile(path) or name.endswith(_WEIGHTS) or name in _INDEXES:
            continue
        if os.path.getsize(path) > MAX_FILE_BYTES:
            skipped.append(name)
            continue
        with open(path, "rb") as f:
            kept[name] = f.read()
    return kept, skipped


class Lineage:
    """The carried files of one checkpoint: {relative path: bytes}, small (a few MB at most)."""

    def __init__(self, files: Optional[dict[str, bytes]] = None) -> None:
        self.files = dict(files or {})

    @classmethod
    def of_source(cls, hf_dir: str, record: dict) -> "Lineage":
        kept, skipped = source_files(hf_dir)
        record = {**record, "kept_files": sorted(kept), "skipped_files": skipped}
        files = {f"{HF_SOURCE}/{k}": v for k, v in kept.items()}
        files[CONVERSION] = json.dumps(record, indent=2, sort_keys=True).encode()
        return cls(files)

    @classmethod
    def read(cls, ckpt_dir: str) -> "Lineage":
        """What `ckpt_dir` (a step directory) carries; empty for a model trained from scratch."""
        files = {}
        conversion = os.path.join(ckpt_dir, CONVERSION)
        if os.path.isfile(conversion):
            with open(conversion, "rb") as f:
                files[CONVERSION] = f.read()
        source = os.path.join(ckpt_dir, HF_SOURCE)
        if os.path.isdir(source):
            for name in sorted(os.listdir(source)):
                with open(os.path.join(source, name), "rb") as f:
                    files[f"{HF_SOURCE}/{name}"] = f.read()
        return cls(files)

    def write(self, ckpt_dir: str) -> None:
        """Into a checkpoint being written (its commit fsyncs and lists them)."""
        for rel, data in self.files.items():
            path = os.path.join(ckpt_dir, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

    @property
    def record(self) -> dict:
        """conversion.json: {} when the model was not converted."""
        data = self.files.get(CONVERSION)
        return json.loads(data) if data else {}

    def hf_file(self, name: str) -> Optional[bytes]:
        return self.files.get(f"{HF_SOURCE}/{name}")

    def hf_files(self) -> dict[str, bytes]:
        prefix = HF_SOURCE + "/"
        return {k[len(prefix):]: v for k, v in self.files.items() if k.startswith(prefix)}

    def hf_config(self) -> Optional[dict]:
        data = self.hf_file("config.json")
        return json.loads(data) if data else None
