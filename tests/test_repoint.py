"""The native re-pointing of host tables (runtime/repoint.py): every address is checked before
any is written, and a bad one leaves every cell as it was."""

from __future__ import annotations

import numpy as np
import pytest

from stepjit.runtime.repoint import Program


def _program(nbytes=(16, 8), itemsize=(4, 8), index=(1, 0)):
    cells = np.zeros(len(nbytes), np.uint64)  # the table entries the program writes
    addresses = np.array([cells.ctypes.data + 8 * i for i in range(len(nbytes))], np.uint64)
    program = Program(np.array(index, np.int64), addresses, np.array(nbytes, np.uint64),
                      np.array(itemsize, np.uint64))
    return program, cells


def _written(*ranges):
    starts = np.array([r[0] for r in ranges], np.uint64)
    ends = np.array([r[1] for r in ranges], np.uint64)
    return starts, ends


def test_checked_addresses_are_written_through_the_index():
    program, cells = _program()
    program.written(*_written((1000, 2000), (5000, 6000)))
    assert program([4096, 3000])  # gradient 0 is addresses[1], gradient 1 addresses[0]
    assert cells.tolist() == [3000, 4096]


@pytest.mark.parametrize("addresses, why", [
    ([4096, 3002], "gradient 0 misaligned for its 4-byte elements"),
    ([4100, 3000], "gradient 1 misaligned for its 8-byte elements"),
    ([4096, 1990], "gradient 0 ends inside a written range"),
    ([5992, 3000], "gradient 1 starts inside a written range"),
    ([4096, 996], "gradient 0 covers a written range's start"),
    ([4096, 5000], "gradient 0 at a written range's start"),
])
def test_one_bad_address_writes_nothing(addresses, why):
    program, cells = _program()
    program.written(*_written((1000, 2000), (5000, 6000)))
    cells[:] = 7
    assert not program(addresses), why
    assert cells.tolist() == [7, 7]


def test_ranges_that_only_touch_are_fine():
    program, cells = _program()
    program.written(*_written((1000, 2000), (5000, 6000)))
    assert program([6000, 984])  # [984, 1000) and [6000, 6008) end and start at the edges
    assert cells.tolist() == [984, 6000]


def test_no_written_ranges_or_no_gradients():
    program, cells = _program()
    program.written(*_written())
    assert program([8, 16]) and cells.tolist() == [16, 8]
    empty, _ = _program(nbytes=(), itemsize=(), index=())
    empty.written(*_written((0, 10)))
    assert empty([])


def test_bad_setup_is_refused():
    with pytest.raises(ValueError, match="powers of two"):
        _program(itemsize=(3, 8))
    program, _ = _program()
    with pytest.raises(ValueError, match="written ranges"):
        program([1, 2])  # written() was never called
    program.written(*_written((0, 8)))
    with pytest.raises(ValueError, match="an address for every"):
        program([8])  # gradient 0 reads addresses[1]
