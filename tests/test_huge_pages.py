"""kernels/huge_pages.py: which bytes get huge pages, and that asking for them never changes a tensor."""
from __future__ import annotations

import mmap

import torch

from moepage.kernels.huge_pages import HUGE_PAGE, collapse, collapse_all, huge_span, merged_spans


def test_the_aligned_interior_of_a_span():
    assert huge_span(HUGE_PAGE + 1, 3 * HUGE_PAGE) == (2 * HUGE_PAGE, 4 * HUGE_PAGE)
    assert huge_span(0, 2 * HUGE_PAGE) == (0, 2 * HUGE_PAGE)
    s, e = huge_span(HUGE_PAGE + 1, HUGE_PAGE)  # no whole huge page inside
    assert s == e


def test_back_to_back_mappings_join_and_gaps_do_not():
    assert merged_spans([(8192, 12288), (0, 4000), (4096, 8192)]) == [(0, 12288)]  # page rounding joins
    assert merged_spans([(0, 4096), (12288, 16384)]) == [(0, 4096), (12288, 16384)]


def test_other_platforms_are_left_alone():
    t = torch.zeros(4 * HUGE_PAGE, dtype=torch.uint8)
    assert collapse(t, platform="darwin") == 0 and collapse_all([t], platform="darwin") == 0


def test_asking_keeps_every_byte():
    """Slots mapped one after another (as the expert cache maps them) and a plain tensor: same bytes after."""
    slots = [torch.frombuffer(mmap.mmap(-1, 3 * HUGE_PAGE // 2, flags=mmap.MAP_PRIVATE), dtype=torch.uint8)
             for _ in range(4)]
    g = torch.Generator().manual_seed(0)
    for s in slots:
        s.copy_(torch.randint(0, 256, s.shape, dtype=torch.uint8, generator=g))
    plain = torch.randint(0, 256, (5 * HUGE_PAGE,), dtype=torch.uint8, generator=g)
    before = [t.clone() for t in slots + [plain]]
    done = collapse_all(slots) + collapse(plain)
    assert done % HUGE_PAGE == 0
    assert all(torch.equal(a, b) for a, b in zip(before, slots + [plain]))
