"""--report-to's trackers: one that is not installed is a one-line error; what W&B's offline run file holds, read back
without wandb's reader. The runs that report to them read their records back: TensorBoard's in test_bf16.py, W&B's in
test_sampling.py."""

import json
import os
import struct

from conftest import error_without


def test_report_to_a_tracker_that_is_not_installed_is_one_line(good, monkeypatch, capsys):
    err = error_without("wandb", good + ["--report-to", "wandb"], monkeypatch, capsys)
    assert err == "iqstar.py: error: --report-to: wandb is not installed (pip install wandb)"
    assert not os.path.exists(good[-1])


def wandb_history(path):
    """The logged rows of an offline W&B run file: a 7-byte header (":W&B", magic, version), then LevelDB's log
    format (32 KiB blocks of records, each behind 7 bytes: crc, length, type 1 full, 2 first, 3 middle, 4 last) of
    wandb's Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, rows, pending, block, pos = open(path, "rb").read(), [], b"", 32768, 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if block - pos % block < 7 or kind == length == 0:  # the padding at a block's end
            pos += block - pos % block
            continue
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                rows.append({k: v for k, v in items.items() if not k.startswith("_")})  # not wandb's own _step
    return rows
