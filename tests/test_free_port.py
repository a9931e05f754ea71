"""free_port: ports that the kernel will not hand to anyone else before the launcher's ranks
bind them (two pytest workers once lost a master port to a concurrent bind(0))."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from dino_scale.engine import distributed
from dino_scale.engine.distributed import PICKED_PORTS, PORT_RANGE_ENV, free_port, port_range


@pytest.fixture
def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path(distributed.EPHEMERAL_RANGE_FILE).read_text().split()
    except OSError:
        pytest.skip(f"no {distributed.EPHEMERAL_RANGE_FILE} (not Linux)")
    if int(low) < PICKED_PORTS[1]:
        pytest.skip(f"this kernel's ephemeral range {low}-{high} overlaps {PICKED_PORTS}")
    return int(low), int(high)


def test_ports_come_from_below_the_kernels_ephemeral_range_and_bind(ephemeral_range):
    low, high = port_range()  # the whole of PICKED_PORTS, or this pytest worker's part of it
    assert PICKED_PORTS[0] <= low < high <= PICKED_PORTS[1]
    ports = {free_port() for _ in range(50)}
    assert all(low <= p < high for p in ports), sorted(ports)
    assert len(ports) > 40  # random draws, not one port over and over
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))


def test_a_port_in_use_is_never_returned(ephemeral_range, monkeypatch):
    base = port_range()[0]
    with socket.socket() as held:
        held.bind(("127.0.0.1", base))
        monkeypatch.setenv(PORT_RANGE_ENV, f"{base}-{base + 2}")
        assert {free_port() for _ in range(20)} == {base + 1}


def test_an_ephemeral_range_that_covers_the_picked_ports_leaves_the_choice_to_the_kernel(
        ephemeral_range, tmp_path, monkeypatch):
    fake = tmp_path / "ip_local_port_range"
    fake.write_text(f"{PICKED_PORTS[0] - 5000}\t60999\n")
    monkeypatch.setattr(distributed, "EPHEMERAL_RANGE_FILE", str(fake))
    low, high = ephemeral_range  # the real kernel still assigns from its own range
    assert all(low <= free_port() <= high for _ in range(5))


@pytest.mark.parametrize("value", ["20000", "a-b", "30000-20000", "80-90"])
def test_a_bad_port_range_names_the_variable(value, monkeypatch):
    monkeypatch.setenv(PORT_RANGE_ENV, value)
    with pytest.raises(ValueError, match=PORT_RANGE_ENV):
        free_port()
