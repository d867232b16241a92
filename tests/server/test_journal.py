"""Journal framing, the group-commit writer, and damage detection."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from crq.server.journal import HEADER, Journal, RecordReader, frame, list_segments


def test_frame_roundtrip_and_sequence(tmp_path: Path) -> None:
    path = tmp_path / "CR.000001"
    path.write_bytes(b"".join(frame(i, f"event {i}".encode()) for i in range(1, 6)))
    reader = RecordReader(path)
    assert [(s, p.decode()) for s, p in reader] == [(i, f"event {i}") for i in range(1, 6)]
    assert reader.damage is None
    assert reader.end == path.stat().st_size


def test_crc_covers_sequence_number(tmp_path: Path) -> None:
    rec = bytearray(frame(7, b"payload"))
    rec[8] ^= 1  # flip a bit of the seq field
    path = tmp_path / "CR.000001"
    path.write_bytes(bytes(rec))
    reader = RecordReader(path)
    assert list(reader) == []
    assert reader.damage is not None and reader.damage.reason == "checksum mismatch"


def test_cut_at_every_byte_of_last_record_is_a_torn_tail(tmp_path: Path) -> None:
    good = b"".join(frame(i, b"x" * (10 + i)) for i in range(1, 4))
    last = frame(4, b"the last record")
    path = tmp_path / "CR.000001"
    for cut in range(1, len(last)):
        path.write_bytes(good + last[:cut])
        reader = RecordReader(path)
        assert [s for s, _ in reader] == [1, 2, 3], cut
        assert reader.damage is not None and reader.damage.tail, cut
        assert reader.damage.offset == len(good)


def test_damage_followed_by_valid_records_is_not_a_tail(tmp_path: Path) -> None:
    recs = [frame(i, b"r" * 20) for i in range(1, 5)]
    data = bytearray(b"".join(recs))
    data[len(recs[0]) + HEADER.size + 3] ^= 0xFF  # garble the payload of record 2
    path = tmp_path / "CR.000001"
    path.write_bytes(bytes(data))
    reader = RecordReader(path)
    assert [s for s, _ in reader] == [1]
    assert reader.damage is not None and not reader.damage.tail
    assert "checksum" in reader.damage.reason


def test_writer_group_commits_and_rotates(tmp_path: Path) -> None:
    async def go() -> None:
        j = Journal(tmp_path, next_seq=1, fsync=True)
        seqs = [j.append(f"e{i}".encode()) for i in range(100)]
        await j.barrier()
        assert seqs == list(range(1, 101)) and j.durable_seq == 100
        j.rotate()
        j.append(b"after rotation")
        await j.barrier()
        j.close()

    asyncio.run(go())
    segs = list_segments(tmp_path)
    assert [p.name for p in segs] == ["CR.000001", "CR.000002"]
    assert [s for s, _ in RecordReader(segs[0])] == list(range(1, 101))
    assert [s for s, _ in RecordReader(segs[1])] == [101]


def test_new_writer_never_appends_to_an_old_segment(tmp_path: Path) -> None:
    (tmp_path / "CR.000003").write_bytes(frame(1, b"old"))
    j = Journal(tmp_path, next_seq=2, fsync=False)
    assert j.segment == 4
    j.close()


def test_barrier_is_immediate_when_idle(tmp_path: Path) -> None:
    async def go() -> bool:
        j = Journal(tmp_path, next_seq=1, fsync=False)
        fut = j.barrier()
        done = fut.done()
        j.close()
        return done

    assert asyncio.run(go())


@pytest.mark.parametrize("payload", [b"", b"{}", b"x" * 70_000])
def test_sizes(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "CR.000001"
    path.write_bytes(frame(1, payload))
    assert list(RecordReader(path)) == [(1, payload)]
