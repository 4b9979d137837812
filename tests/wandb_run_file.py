"""Read an offline W&B run file (``run-*.wandb``) once W&B has finished writing it.

The file is a LevelDB-style log: a 7-byte header (``:W&B`` + magic + version), then 32 KiB blocks of chunks,
each with a 7-byte header (CRC32 of type byte + payload, little-endian length, type: 1 full, 2 first,
3 middle, 4 last) and a protobuf ``Record`` payload. ``wandb.finish`` returns before wandb-core has flushed
the file, so a reader must not trust what it sees until the run's ``exit`` record is there and every chunk
before it passes its CRC: :func:`finished_run_records` polls for exactly that, so a half-written record is
never parsed (it once failed a test with ``DecodeError: Wire format was corrupt``).
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

_BLOCK, _HEADER = 32768, 7
_TYPE_CRC = [zlib.crc32(bytes([kind])) for kind in range(5)]


class Incomplete(Exception):
    """The file ends inside a chunk, or a chunk's CRC does not match yet: W&B is still writing."""


def _records(data: bytes) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    if data[:4] != b":W&B":
        raise Incomplete("no W&B header yet")
    records, pos, pending = [], _HEADER, None
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # a block tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:  # zero padding up to the block end
            pos += _BLOCK - pos % _BLOCK
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        if kind not in (1, 2, 3, 4) or len(chunk) < length:
            raise Incomplete(f"chunk at byte {pos} is not complete")
        if zlib.crc32(chunk, _TYPE_CRC[kind]) & 0xFFFFFFFF != crc:
            raise Incomplete(f"CRC mismatch at byte {pos}")
        pos += _HEADER + length
        if kind in (1, 2):
            pending = chunk
        else:
            if pending is None:
                raise Incomplete(f"continuation chunk without a first chunk at byte {pos}")
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = None
    return records


def finished_run_records(run_file: Path, timeout: float = 60.0) -> list[Any]:
    """All records of ``run_file`` once its ``exit`` record is written and every chunk checks out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = _records(Path(run_file).read_bytes())
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                return records
            why = "no exit record yet"
        except Incomplete as err:
            why = str(err)
        if time.monotonic() > deadline:
            raise AssertionError(f"W&B did not finish writing {run_file} within {timeout} s: {why}")
        time.sleep(0.2)


def history_rows(records: list[Any]) -> list[dict[str, Any]]:
    """The ``run.log`` rows of the records: ``{key: value}`` with nested keys joined by ``/``."""
    return [
        {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
