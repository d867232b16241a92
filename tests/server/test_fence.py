"""Fences (server/fence.py): what a deposed leader writes past its fence never counts.

The journals here are written record by record, as two leaders sharing a swd would leave
them: the old one (epoch 1) going on past the point where the new one (epoch 2) took over.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from crq.server import checkpoint, commands, fence, marks, replay, snapshot
from crq.server.events import encode
from crq.server.journal import Deposed, Journal, RecordReader, frame, list_segments

from tests.core import Core, fingerprint


def _segment(trace: Path, number: int, epoch: int, records: list[tuple[int, bytes]]) -> Path:
    trace.mkdir(parents=True, exist_ok=True)
    path = trace / f"CR.{number:06d}"
    with open(path, "wb") as f:
        f.write(fence.header(epoch))
        for seq, payload in records:
            f.write(frame(seq, payload))
    return path


def _two_leaders(trace: Path) -> tuple[Core, Core]:
    """Epoch 1 writes events 1-6 and is replaced after 4; it goes on with 5-6 (its own,
    fenced), while epoch 2 writes its own 5-7. Returns what each leader believed."""
    old = Core()
    for _ in range(6):
        old.submit(1)
    assert len(old.events) > 5
    new = Core()
    for ev in old.events[:4]:
        new.emit([ev])
    take = commands.take_over(2, 4, {"url": "http://b"}, {"epoch": 1, "url": "http://a"}, 5.0)
    new.emit([take])
    new.submit(1)
    new.submit(1)
    _segment(trace, 1, 1, [(i + 1, encode(ev)) for i, ev in enumerate(old.events)])
    _segment(trace, 2, 2, [(i + 5, encode(ev)) for i, ev in enumerate(new.events[4:])])
    fences = fence.Fences([fence.Fence(1, 0), fence.Fence(2, 4)])
    fence.write(trace, fences)
    return old, new


def test_replay_keeps_the_new_leader_and_drops_what_the_old_wrote_past_the_fence(
    tmp_path: Path,
) -> None:
    old, new = _two_leaders(tmp_path)
    loaded = replay.load(tmp_path, None)
    assert loaded.fenced == len(old.events) - 4 and not loaded.losses
    assert fingerprint(loaded.state) == fingerprint(new.state)
    assert loaded.state.epoch == 2 and loaded.state.leader == {"url": "http://b"}
    assert loaded.highest_epoch == 2


def test_a_deposed_leader_rotating_into_a_later_segment_is_ignored_too(tmp_path: Path) -> None:
    old, new = _two_leaders(tmp_path)
    more = Core()
    more.submit(1)
    late = len(old.events) + 1
    _segment(tmp_path, 3, 1, [(late, encode(more.events[-1]))])  # after the new one's
    # and a torn write of it at the end of its first segment: past the fence, not damage
    with open(tmp_path / "CR.000001", "ab") as f:
        f.write(frame(late + 1, b'{"e":"submit"')[:-3])
    loaded = replay.load(tmp_path, None)
    assert loaded.fenced == len(old.events) - 4 + 1 and not loaded.losses
    assert fingerprint(loaded.state) == fingerprint(new.state)


def test_damage_before_the_fence_is_still_damage(tmp_path: Path) -> None:
    _two_leaders(tmp_path)
    seg = tmp_path / "CR.000001"
    data = bytearray(seg.read_bytes())
    data[fence.HEADER.size + 20] ^= 0xFF  # inside event 1, which counts
    seg.write_bytes(bytes(data))
    with pytest.raises(replay.ReplayError, match="--accept-loss"):
        replay.load(tmp_path, None)


def test_a_snapshot_and_a_mark_of_the_deposed_leader_past_the_fence_do_not_count(
    tmp_path: Path,
) -> None:
    old, new = _two_leaders(tmp_path)
    old.state.epoch = 1
    snapshot.write(old.state, tmp_path, fsync=False)  # past the fence at 4
    n = len(old.events)
    marks.write_mark(tmp_path, marks.Mark(n, 1, 10_000, 7, 10_001, 0.0, epoch=1))
    loaded = replay.load(tmp_path, None)
    assert loaded.snapshot is None and not loaded.losses
    assert fingerprint(loaded.state) == fingerprint(new.state)


def test_pruning_never_takes_a_newer_epochs_segment_and_a_deposed_leader_prunes_nothing(
    tmp_path: Path,
) -> None:
    _, new = _two_leaders(tmp_path)
    snapshot.write(new.state, tmp_path, fsync=False)
    before = list_segments(tmp_path)
    checkpoint.prune(tmp_path, epoch=1)  # the deposed one
    assert list_segments(tmp_path) == before
    checkpoint.prune(tmp_path, epoch=2)  # the leader: its snapshot covers both segments
    left = list_segments(tmp_path)
    assert [p.name for p in left] == ["CR.000002"]  # the newest always stays


def test_the_journal_heads_each_segment_with_its_epoch_and_stops_when_deposed(
    tmp_path: Path,
) -> None:
    leading = [True]
    j = Journal(tmp_path, next_seq=1, fsync=False, epoch=7, guard=lambda: leading[0])
    j.append(b"{}")
    j.flush_now()
    reader = RecordReader(list_segments(tmp_path)[-1])
    assert reader.epoch == 7 and [seq for seq, _ in reader] == [1]
    leading[0] = False
    j.append(b"{}")
    with pytest.raises(Deposed):
        j.flush_now()
    j._executor.shutdown()
    assert [seq for seq, _ in RecordReader(list_segments(tmp_path)[-1])] == [1]
